"""Tiled inference: any image size in bounded memory, exact where the overlap covers the receptive field.

The LR image is cut into core blocks of ``tile`` x ``tile`` pixels (the last row/column of blocks may be
smaller). Each block is run with ``overlap`` extra LR pixels of context on every side (fewer at the image border,
where the untiled model also sees the border) and only its core, times the scale, is written to the output. A
convolutional network whose receptive radius (in LR pixels) is at most ``overlap`` therefore gives exactly the
untiled output; a smaller overlap differs only near the seams. Memory: one padded tile in flight plus the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from sls_deploy.core.errors import BundleError, UsageError

Infer = Callable[[np.ndarray], np.ndarray]  # (1, 3, h, w) float32 in [0, 1] -> (1, 3, h*s, w*s)


@dataclass(frozen=True)
class Window:
    """A core block [y0, y1) x [x0, x1) and the context window [cy0, cy1) x [cx0, cx1) it is run with (LR)."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def check_tiling(tile: int, overlap: int, min_size: int) -> None:
    if tile < min_size:
        raise UsageError(f"--tile {tile} is smaller than the model's minimum input of {min_size} pixels")
    if overlap < 0:
        raise UsageError(f"--overlap must be >= 0, not {overlap}")


def windows(h: int, w: int, tile: int, overlap: int) -> list[Window]:
    """Core blocks covering an h x w image exactly once, with their context windows."""
    if tile < 1:
        raise UsageError(f"--tile must be >= 1, not {tile}")
    out = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
            out.append(Window(y0, y1, x0, x1, max(0, y0 - overlap), min(h, y1 + overlap),
                              max(0, x0 - overlap), min(w, x1 + overlap)))
    return out


def _grow(win: Window, h: int, w: int, min_size: int) -> Window:
    """Widen a context window to at least ``min_size`` per side where the image allows (a thin last block)."""
    cy0, cy1, cx0, cx1 = win.cy0, win.cy1, win.cx0, win.cx1
    while cy1 - cy0 < min(min_size, h):
        cy0, cy1 = (cy0 - 1, cy1) if cy0 > 0 else (cy0, cy1 + 1)
    while cx1 - cx0 < min(min_size, w):
        cx0, cx1 = (cx0 - 1, cx1) if cx0 > 0 else (cx0, cx1 + 1)
    return Window(win.y0, win.y1, win.x0, win.x1, cy0, cy1, cx0, cx1)


def upscale_tiled(img: np.ndarray, infer: Infer, scale: int, tile: int, overlap: int, out: np.ndarray,
                  min_size: int = 1, on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """Run ``infer`` over ``img`` (H x W x 3 float32 in [0, 1]) tile by tile into ``out`` ((H*s) x (W*s) x 3,
    float32 in [0, 1] or uint8 0..255, allocated by the caller). Returns ``out``."""
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise UsageError(f"an input {w} px wide x {h} px tall is smaller than the model's minimum input of "
                         f"{min_size} px per side")
    if out.shape != (h * scale, w * scale, 3):
        raise ValueError(f"output array has shape {out.shape}, expected {(h * scale, w * scale, 3)}")
    for win in tiles(h, w, tile, overlap, min_size):
        x = np.ascontiguousarray(img[win.cy0:win.cy1, win.cx0:win.cx1].transpose(2, 0, 1)[None], dtype=np.float32)
        y = np.asarray(infer(x), dtype=np.float32)
        expect = (1, 3, (win.cy1 - win.cy0) * scale, (win.cx1 - win.cx0) * scale)
        if y.shape != expect:
            raise BundleError(f"the model returned {'x'.join(map(str, y.shape))} for an input of "
                              f"{'x'.join(map(str, x.shape))}, not the {'x'.join(map(str, expect))} of scale x{scale}: "
                              "the graph does not match the bundle's recipe (rebuild the bundle)")
        oy, ox = (win.y0 - win.cy0) * scale, (win.x0 - win.cx0) * scale
        core = y[0, :, oy:oy + (win.y1 - win.y0) * scale, ox:ox + (win.x1 - win.x0) * scale].transpose(1, 2, 0)
        core = np.clip(core, 0.0, 1.0)
        dst = out[win.y0 * scale:win.y1 * scale, win.x0 * scale:win.x1 * scale]
        dst[...] = np.round(core * 255.0) if out.dtype == np.uint8 else core
        if on_tile is not None:
            on_tile()
    return out


def tiles(h: int, w: int, tile: int, overlap: int, min_size: int = 1) -> Iterator[Window]:
    for win in windows(h, w, tile, overlap):
        yield _grow(win, h, w, min_size)


def tile_count(h: int, w: int, tile: int) -> int:
    return -(-h // tile) * -(-w // tile)
