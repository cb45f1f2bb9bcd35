"""The LR patch grid of patch-wise inference: positions covering an image, extraction and stitching.

Patches of ``size`` x ``size`` LR pixels start every ``stride`` pixels, the last row and column aligned to the
image's edge so every pixel is covered; overlapping outputs are averaged when stitched (as ClassSR's public code,
``codes/models/ClassSR_model.py``). Each patch runs on its own (zero padding at its border, as it would on a
device), so the overlap is real work: ``coverage`` is the pixels run over the image's pixels, the factor by which
patch-wise inference costs more than one whole-image run of the same model.
"""

from __future__ import annotations

import torch

from sls_deploy.core.errors import DataError


def starts(n: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis of length ``n``: 0, stride, 2*stride, ..., and ``n - size`` last."""
    if size < 1 or stride < 1 or stride > size:
        raise DataError(f"patch size {size} and stride {stride}: need 1 <= stride <= size")
    if n < size:
        raise DataError(f"an image side of {n} LR pixels is smaller than the patch size {size}")
    out = list(range(0, n - size + 1, stride))
    if out[-1] != n - size:
        out.append(n - size)
    return out


def grid(h: int, w: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) of every patch of an ``h`` x ``w`` LR image, row by row."""
    return [(y, x) for y in starts(h, size, stride) for x in starts(w, size, stride)]


def extract(lr: torch.Tensor, positions: list[tuple[int, int]], size: int) -> torch.Tensor:
    """(1, C, h, w) -> (N, C, size, size), one patch per position."""
    return torch.cat([lr[:, :, y:y + size, x:x + size] for y, x in positions], dim=0)


def stitch(outs: torch.Tensor, positions: list[tuple[int, int]], scale: int, h: int, w: int) -> torch.Tensor:
    """(N, C, size*scale, size*scale) patch outputs -> (1, C, h*scale, w*scale), overlaps averaged."""
    n, c, ph, pw = outs.shape
    if n != len(positions):
        raise DataError(f"{n} patch outputs for {len(positions)} positions")
    acc = torch.zeros(1, c, h * scale, w * scale, dtype=outs.dtype)
    hits = torch.zeros(1, 1, h * scale, w * scale, dtype=outs.dtype)
    for o, (y, x) in zip(outs, positions):
        ys, xs = y * scale, x * scale
        acc[0, :, ys:ys + ph, xs:xs + pw] += o
        hits[0, :, ys:ys + ph, xs:xs + pw] += 1
    return acc / hits


def coverage(positions: list[tuple[int, int]], size: int, h: int, w: int) -> float:
    """LR pixels run (every patch in full) over the image's LR pixels: >= 1, the overlap's extra cost."""
    return len(positions) * size * size / (h * w)
