"""Random aligned LR/HR patch sampling for training (flips and 90-degree rotations)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from sls_deploy.core.errors import DataError
from sls_deploy.data.images import load_pair


class PatchSampler:
    """Keeps the LR/HR pairs in memory and draws random batches from a seeded generator.

    Its state is the generator's state, so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(self, files: Sequence[str | os.PathLike], scale: int, lr_patch: int, batch_size: int,
                 seed: int = 0):
        if lr_patch < 1 or batch_size < 1:
            raise DataError("patch size and batch size must be >= 1")
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for f in files:
            hr, lr = load_pair(f, scale)
            if min(lr.shape[-2:]) < lr_patch:
                raise DataError(
                    f"image {Path(f).name} ({hr.shape[-1]}x{hr.shape[-2]}) is smaller than one training patch "
                    f"({lr_patch * scale}x{lr_patch * scale} HR)")
            self.pairs.append((hr, lr))
        if not self.pairs:
            raise DataError("no training images")
        # Sample images in proportion to their area so large images are not under-used.
        self.weights = torch.tensor([float(lr.shape[-1] * lr.shape[-2]) for _, lr in self.pairs])
        self.generator = torch.Generator().manual_seed(seed)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g, p, s = self.generator, self.lr_patch, self.scale
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        lrs, hrs = [], []
        for i in idx.tolist():
            hr, lr = self.pairs[i]
            h, w = lr.shape[-2:]
            y = int(torch.randint(0, h - p + 1, (1,), generator=g))
            x = int(torch.randint(0, w - p + 1, (1,), generator=g))
            lp = lr[:, :, y:y + p, x:x + p]
            hp = hr[:, :, y * s:(y + p) * s, x * s:(x + p) * s]
            lp, hp = dihedral(lp, hp, int(torch.randint(0, 8, (1,), generator=g)))
            lrs.append(lp)
            hrs.append(hp)
        return torch.cat(lrs).contiguous(), torch.cat(hrs).contiguous()


def dihedral(lr: torch.Tensor, hr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/transpositions of a patch pair (bits of ``k``: flip W, flip H, transpose)."""
    if k & 1:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if k & 2:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if k & 4:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr, hr
