"""Random aligned LR/HR patch sampling for training (flips and 90-degree rotations)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from sls_deploy.core.errors import DataError
from sls_deploy.data.degradations import Degradation, default_degradation
from sls_deploy.data.images import load_pair, mod_crop, read_rgb, to_tensor


class PatchSampler:
    """Keeps the LR/HR pairs in memory and draws random batches from a seeded generator.

    ``degradation`` makes the inputs (default: bicubic downscaling by ``scale``). A deterministic one is applied
    once per image and patches are aligned crops of the pair; a ``random_per_patch`` one (e.g. blur) is drawn
    anew for every patch: the sampler keeps the HR images reflect-padded by the degradation's context, degrades
    each HR crop with that margin and keeps the centre, so a patch equals the crop of the whole degraded image.
    Its state is the generator's state (kernels included), so a resumed run draws the same batches as an
    uninterrupted one.
    """

    def __init__(self, files: Sequence[str | os.PathLike], scale: int, lr_patch: int, batch_size: int,
                 seed: int = 0, degradation: Degradation | None = None):
        if lr_patch < 1 or batch_size < 1:
            raise DataError("patch size and batch size must be >= 1")
        self.degradation = default_degradation(scale, degradation)
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        self.per_patch = bool(self.degradation.random_per_patch)
        # HR margin around a per-patch crop: the degradation's context, rounded up to a multiple of the scale
        self.margin = -(-self.degradation.context() // scale) * scale if self.per_patch else 0
        self.pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for f in files:
            if self.per_patch:
                hr = to_tensor(mod_crop(read_rgb(f), scale))
                lr_hw = (hr.shape[-2] // scale, hr.shape[-1] // scale)
                lr = None
            else:
                hr, lr = load_pair(f, scale, self.degradation)
                lr_hw = tuple(lr.shape[-2:])
            if min(lr_hw) < lr_patch:
                raise DataError(
                    f"image {Path(f).name} ({hr.shape[-1]}x{hr.shape[-2]}) is smaller than one training patch "
                    f"({lr_patch * scale}x{lr_patch * scale} HR)")
            if self.per_patch and self.margin:
                m = self.margin
                if min(hr.shape[-2:]) <= m:
                    raise DataError(f"image {Path(f).name} ({hr.shape[-1]}x{hr.shape[-2]}) is smaller than the "
                                    f"{self.degradation.name} degradation's {m}-pixel border")
                hr = F.pad(hr, (m, m, m, m), mode="reflect")
            self.pairs.append((hr, lr))
        if not self.pairs:
            raise DataError("no training images")
        # Sample images in proportion to their area so large images are not under-used.
        self.weights = torch.tensor([float(self._lr_hw(i)[0] * self._lr_hw(i)[1]) for i in range(len(self.pairs))])
        self.generator = torch.Generator().manual_seed(seed)

    def _lr_hw(self, i: int) -> tuple[int, int]:
        hr, lr = self.pairs[i]
        if lr is not None:
            return lr.shape[-2], lr.shape[-1]
        m2 = 2 * self.margin
        return (hr.shape[-2] - m2) // self.scale, (hr.shape[-1] - m2) // self.scale

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
            h, w = self._lr_hw(i)
            y = int(torch.randint(0, h - p + 1, (1,), generator=g))
            x = int(torch.randint(0, w - p + 1, (1,), generator=g))
            k = int(torch.randint(0, 8, (1,), generator=g))
            if lr is None:
                lp, hp = self._degraded_crop(hr, y, x, int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
            else:
                lp = lr[:, :, y:y + p, x:x + p]
                hp = hr[:, :, y * s:(y + p) * s, x * s:(x + p) * s]
            lp, hp = dihedral(lp, hp, k)
            lrs.append(lp)
            hrs.append(hp)
        return torch.cat(lrs).contiguous(), torch.cat(hrs).contiguous()

    def _degraded_crop(self, hr_padded: torch.Tensor, y: int, x: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LR patch (y, x) of a per-patch degradation drawn from ``seed``, and its HR patch."""
        p, s, m = self.lr_patch, self.scale, self.margin
        region = hr_padded[:, :, y * s:(y + p) * s + 2 * m, x * s:(x + p) * s + 2 * m]
        lr = self.degradation.degrade_tensor(region, seed)
        ml = m // s
        return lr[:, :, ml:ml + p, ml:ml + p], region[:, :, m:m + p * s, m:m + p * s]


def dihedral(lr: torch.Tensor, hr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/transpositions of a patch pair (bits of ``k``: flip W, flip H, transpose)."""
    if k & 1:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if k & 2:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if k & 4:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr, hr
