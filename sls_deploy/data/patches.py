"""Random aligned LR/HR patch sampling for training (flips and 90-degree rotations), read lazily from disk."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from sls_deploy.core.errors import DataError
from sls_deploy.data.catalog import TrainImage, scan_images
from sls_deploy.data.degradations import Degradation, default_degradation
from sls_deploy.data.images import pixels_to_float, to_tensor
from sls_deploy.data.stream import DECODED_CACHE_BYTES, BatchStream, DecodedCache, resolve_workers


class PatchSampler:
    """Draws random batches of LR/HR patch pairs from a seeded generator; holds only the images' sizes.

    ``degradation`` makes the inputs (default: bicubic downscaling by ``scale``). The images' sizes come from
    their headers (``catalog.scan_images``): an image smaller than one patch is named here, before any pixel is
    decoded. Pixels are read when a batch is made, in ``workers`` worker processes (``stream.BatchStream``;
    ``auto``: none for a set small enough to stay decoded in the cache, else one per spare core).

    A patch is what the whole-image pipeline gave, bit for bit: a deterministic degradation (bicubic) is
    applied to the HR crop plus a margin wider than its kernel (clipped at the image border) and the margin is
    cut off, which equals the crop of the whole degraded image; a ``random_per_patch`` one (e.g. blur) is
    drawn anew for every patch and applied to the HR crop plus its context, reflected at the image border, the
    centre kept. Its state is the generator's state (kernels included), so a resumed run draws the same batches
    as an uninterrupted one.
    """

    def __init__(self, files: Sequence[str | os.PathLike | TrainImage], scale: int, lr_patch: int,
                 batch_size: int, seed: int = 0, degradation: Degradation | None = None,
                 workers: int | str | None = "auto", cache_bytes: int = DECODED_CACHE_BYTES):
        if lr_patch < 1 or batch_size < 1:
            raise DataError("patch size and batch size must be >= 1")
        self.degradation = default_degradation(scale, degradation)
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        self.per_patch = bool(self.degradation.random_per_patch)
        # HR margin around a per-patch crop: the degradation's context, rounded up to a multiple of the scale
        self.margin = -(-self.degradation.context() // scale) * scale if self.per_patch else 0
        if not files:
            raise DataError("no training images")
        self.images = scan_images(files)
        self.lr_hw: list[tuple[int, int]] = []
        for im in self.images:
            h, w = im.height // scale, im.width // scale
            if min(h, w) < lr_patch:
                raise DataError(f"image {im.name} ({w * scale}x{h * scale}) is smaller than one training patch "
                                f"({lr_patch * scale}x{lr_patch * scale} HR)")
            if self.per_patch and self.margin and min(h, w) * scale <= self.margin:
                raise DataError(f"image {im.name} ({w * scale}x{h * scale}) is smaller than the "
                                f"{self.degradation.name} degradation's {self.margin}-pixel border")
            self.lr_hw.append((h, w))
        # Sample images in proportion to their area so large images are not under-used.
        self.weights = torch.tensor([float(h * w) for h, w in self.lr_hw])
        decoded = sum(im.decoded_bytes for im in self.images if not im.cached)
        self.workers = resolve_workers(workers, decoded)
        # a set whose pixels and whole-image inputs fit each process's cache keeps both (the shipped photos):
        # patches are then plain crops, as fast as the former in-memory sampler's, and the same values
        lr_bytes = sum(im.decoded_bytes for im in self.images) * 4 // scale ** 2
        whole = not self.per_patch and decoded + lr_bytes <= cache_bytes // max(1, self.workers)
        self.builder = PatchBuilder(self.images, scale, lr_patch, self.degradation, self.margin,
                                     DecodedCache(cache_bytes), whole_inputs=whole)
        draw = PatchDraw(self.weights, self.lr_hw, lr_patch, batch_size, self.per_patch)
        self._stream = BatchStream(draw, self.builder, seed, self.workers)

    def state(self) -> torch.Tensor:
        return self._stream.state()

    def set_state(self, state: torch.Tensor) -> None:
        self._stream.set_state(state)

    def use_device(self, device: torch.device | str) -> None:
        """The model's device: batches are pinned for CUDA."""
        self._stream.use_device(device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stream.next()

    def close(self) -> None:
        self._stream.close()


class PatchDraw:
    """Draws one batch's description (in the training process; it holds no reference to the sampler, so a
    sampler dropped is freed, and its workers stopped, at once)."""

    def __init__(self, weights: torch.Tensor, lr_hw: Sequence[tuple[int, int]], lr_patch: int, batch_size: int,
                 per_patch: bool):
        self.weights, self.lr_hw, self.lr_patch, self.batch_size, self.per_patch = \
            weights, list(lr_hw), lr_patch, batch_size, per_patch

    def __call__(self, g: torch.Generator) -> list[tuple[int, int, int, int, int | None]]:
        """(image, LR y, LR x, dihedral k, kernel seed or None) per patch, in the former sampler's order."""
        p = self.lr_patch
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        spec = []
        for i in idx.tolist():
            h, w = self.lr_hw[i]
            y = int(torch.randint(0, h - p + 1, (1,), generator=g))
            x = int(torch.randint(0, w - p + 1, (1,), generator=g))
            k = int(torch.randint(0, 8, (1,), generator=g))
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)) if self.per_patch else None
            spec.append((i, y, x, k, seed))
        return spec


class PatchBuilder:
    """Makes one batch from its description (runs in a worker process): decode, crop, degrade, augment."""

    def __init__(self, images: Sequence[TrainImage], scale: int, lr_patch: int, degradation: Degradation,
                 margin: int, cache: DecodedCache, whole_inputs: bool = False):
        self.images, self.scale, self.lr_patch = list(images), scale, lr_patch
        self.degradation, self.margin, self.cache = degradation, margin, cache
        self.whole_inputs = whole_inputs  # a deterministic degradation applied to whole images, kept in the cache
        # LR pixels around a deterministic degradation's crop: one more than its kernel reaches
        self.lr_margin = -(-degradation.context() // scale) + 1

    def pixels(self, i: int) -> np.ndarray:
        im = self.images[i]
        if im.cached:
            return im.pixels()
        px = self.cache.get(("image", str(im.path)), im.pixels)
        if px.shape[:2] != (im.height, im.width):
            raise DataError(f"image {im.path} is {px.shape[1]}x{px.shape[0]} but its header said "
                            f"{im.width}x{im.height}")
        return px

    def __call__(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        lrs: list = [None] * len(spec)
        hrs: list = [None] * len(spec)
        order: dict[int, list[int]] = {}
        for j, item in enumerate(spec):
            order.setdefault(item[0], []).append(j)
        for i, members in order.items():  # each image read once per batch
            px = self.pixels(i)
            for j in members:
                _, y, x, k, seed = spec[j]
                lp, hp = self.crop(i, px, y, x, seed)
                lrs[j], hrs[j] = dihedral(lp, hp, k)
            del px
        return torch.cat(lrs).contiguous(), torch.cat(hrs).contiguous()

    def crop(self, i: int, px: np.ndarray, y: int, x: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """LR patch (y, x) and its HR patch from image ``i``'s pixels (1x3xpxp, 1x3x(ps)x(ps))."""
        p, s = self.lr_patch, self.scale
        h, w = px.shape[0] // s, px.shape[1] // s
        if seed is not None:  # random per patch: the HR crop plus its context, reflected at the border
            m = self.margin
            rows = _reflect(np.arange(y * s - m, (y + p) * s + m), h * s)
            cols = _reflect(np.arange(x * s - m, (x + p) * s + m), w * s)
            region = to_tensor(pixels_to_float(px[rows][:, cols]))
            lr = self.degradation.degrade_tensor(region, seed)
            ml = m // s
            return lr[:, :, ml:ml + p, ml:ml + p], region[:, :, m:m + p * s, m:m + p * s]
        name = self.images[i].name
        if self.whole_inputs:
            lr = self.cache.get(("input", i), lambda: self.degradation.degrade_tensor(
                to_tensor(pixels_to_float(px[:h * s, :w * s])), self.degradation.eval_seed(name)))
            hr = to_tensor(pixels_to_float(px[y * s:(y + p) * s, x * s:(x + p) * s]))
            return lr[:, :, y:y + p, x:x + p], hr
        ml = self.lr_margin
        y0, x0 = max(0, y - ml), max(0, x - ml)
        y1, x1 = min(h, y + p + ml), min(w, x + p + ml)
        region = to_tensor(pixels_to_float(px[y0 * s:y1 * s, x0 * s:x1 * s]))
        lr = self.degradation.degrade_tensor(region, self.degradation.eval_seed(name))
        lr = lr[:, :, y - y0:y - y0 + p, x - x0:x - x0 + p]
        return lr, region[:, :, (y - y0) * s:(y - y0 + p) * s, (x - x0) * s:(x - x0 + p) * s]


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices outside [0, n) reflected back inside, as ``F.pad(mode="reflect")`` pads (edge not repeated)."""
    idx = np.abs(idx)
    return np.where(idx >= n, 2 * (n - 1) - idx, idx)


def dihedral(lr: torch.Tensor, hr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/transpositions of a patch pair (bits of ``k``: flip W, flip H, transpose)."""
    if k & 1:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if k & 2:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if k & 4:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr, hr
