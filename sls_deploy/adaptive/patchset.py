"""Training patches for routers: random LR crops of the train images with every candidate's error on them.

Each crop runs through every candidate on its own (as it will at inference), and its error is the MSE on the Y
channel (BT.601, the metric channel of the eval PSNR) against the HR crop, in 8-bit units. Routers learn from
one part of the crops and calibrate their operating point (a threshold, beta) on the rest: train data only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sls_deploy.adaptive.members import Candidate
from sls_deploy.core.errors import DataError
from sls_deploy.data.catalog import scan_images
from sls_deploy.data.images import pair_from_pixels
from sls_deploy.data.stream import ordered_map, resolve_workers


@dataclass
class PatchSet:
    lr: torch.Tensor      # (N, 3, p, p) in [0, 1]
    errors: torch.Tensor  # (N, K) MSE of each candidate on the Y channel, 8-bit units
    costs: torch.Tensor   # (K,) each candidate's MACs / dense MACs, ascending

    def __post_init__(self) -> None:
        if self.errors.shape != (self.lr.shape[0], self.costs.numel()):
            raise DataError(f"errors of shape {tuple(self.errors.shape)} for {self.lr.shape[0]} patches and "
                            f"{self.costs.numel()} candidates")
        if bool((self.costs[1:] < self.costs[:-1]).any()):
            raise DataError("candidates must be ordered by cost, cheapest first")

    def to(self, device) -> "PatchSet":
        """The same patches, errors and costs on ``device`` (where the routers train)."""
        return PatchSet(self.lr.to(device), self.errors.to(device), self.costs.to(device))

    def split(self, fraction: float, seed: int = 0) -> tuple["PatchSet", "PatchSet"]:
        """(fit part, calibration part): a seeded random split, ``fraction`` of the patches for fitting."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.lr.shape[0], generator=g).to(self.lr.device)  # the CPU stream: same split anywhere
        k = max(1, min(self.lr.shape[0] - 1, int(round(fraction * self.lr.shape[0]))))
        a, b = order[:k], order[k:]
        return (PatchSet(self.lr[a], self.errors[a], self.costs), PatchSet(self.lr[b], self.errors[b], self.costs))


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) RGB in [0, 1] -> (N, 1, h, w) BT.601 Y in [16, 235] (as ``data.metrics.rgb_to_y``)."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * w).sum(1, keepdim=True) + 16.0


def y_mse(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Per-patch MSE on Y of 8-bit-rounded outputs, ``border`` output pixels cropped on each side."""
    a = luma(torch.round(sr.clamp(0, 1) * 255) / 255)
    b = luma(torch.round(hr.clamp(0, 1) * 255) / 255)
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def random_crops(files: Sequence, scale: int, size: int, count: int, seed: int = 0,
                 degradation=None, workers: int | str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` LR crops of ``size`` (and their HR crops) spread evenly over the ``files`` (paths or
    ``TrainImage``) at least that large, at seeded positions. Sizes come from the headers; the positions are
    drawn here, then each image is read, degraded whole and cut by a loader worker, one image at a time."""
    if not files:
        raise DataError("no training images to cut router patches from")
    rng = np.random.default_rng(seed)
    images = [im for im in scan_images(files) if min(im.height // scale, im.width // scale) >= size]
    if not images:  # smaller images give no crop
        raise DataError(f"no train image is as large as the router patch ({size} LR pixels)")
    per = [count // len(images) + (1 if i < count % len(images) else 0) for i in range(len(images))]
    jobs = []
    for im, k in zip(images, per):
        h, w = im.height // scale, im.width // scale
        ys = rng.integers(0, h - size + 1, k)
        xs = rng.integers(0, w - size + 1, k)
        jobs.append((im, list(zip(ys.tolist(), xs.tolist()))))
    cut = _Cutter(scale, size, degradation)
    n = resolve_workers(workers, sum(im.decoded_bytes for im in images if not im.cached))
    lrs, hrs = [], []
    for lr, hr in ordered_map(cut, jobs, n):
        lrs.append(lr)
        hrs.append(hr)
    return torch.cat(lrs), torch.cat(hrs)


class _Cutter:
    """One image's crops at given LR positions, from the pair of the whole image (as ``load_pair`` makes it)."""

    def __init__(self, scale: int, size: int, degradation):
        self.scale, self.size, self.degradation = scale, size, degradation

    def __call__(self, job) -> tuple[torch.Tensor, torch.Tensor]:
        im, positions = job
        s, p = self.scale, self.size
        hr, lr = pair_from_pixels(im.pixels(), im.name, s, self.degradation)
        lrs = [lr[:, :, y:y + p, x:x + p] for y, x in positions]
        hrs = [hr[:, :, y * s:(y + p) * s, x * s:(x + p) * s] for y, x in positions]
        return torch.cat(lrs), torch.cat(hrs)


def patch_set(candidates: Sequence[Candidate], lr: torch.Tensor, hr: torch.Tensor, progress=None) -> PatchSet:
    """Every candidate run on every crop; their per-crop errors."""
    errors = []
    for c in candidates:
        errors.append(y_mse(c.run(lr), hr))
        if progress:
            progress(c.name)
    return PatchSet(lr, torch.stack(errors, dim=1), torch.tensor([c.cost for c in candidates]))
