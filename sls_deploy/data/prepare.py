"""``sls-deploy prepare-data``: training images cut into sub-images and/or packed into a uint8 memmap cache.

**Sub-images** (BasicSR's data preparation for DIV2K): every image is cut into ``crop`` x ``crop`` windows
every ``step`` pixels, rows then columns; where the last window leaves more than ``thresh`` pixels at the
bottom or right edge, one more window flush with that edge is added. DIV2K's 2040x1356 at 480/240 gives 5 x 8
= 40 windows. An image no larger than the crop in a direction keeps its whole extent there; ``crop`` 0 keeps
whole images. A window is named ``<stem>_s<k>.png``, k counting from 001 in row-major order. A sub-image
decodes about ten times faster than a whole DIV2K image, so the loader's workers keep up with training.

**Formats.** ``png``: one 8-bit RGB PNG per window (zlib level ``compress_level``; 3 as BasicSR), a folder
training reads like any image folder. ``memmap``: every window's H x W x 3 uint8 pixels one after the other in
``images.u8``, indexed in ``prepare-data.json`` (``catalog.memmap_images``): a crop then reads only the rows it
covers, nothing is decoded during training, and the page cache serves a slow disk. 16-bit and float images
are rounded to 8 bits (``round(value * 255)``). Patches drawn from either format equal those drawn from the
source images' windows, bit for bit.

**Safety.** The output folder is written beside its final place and renamed into it at the end, so an
interrupted or failed run leaves nothing under that name; a folder prepare-data did not write (no
``prepare-data.json`` of its own) is never replaced, nor one holding the source.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.errors import DataError, UsageError
from sls_deploy.data.catalog import CREATED_BY, MARKER, MEMMAP_DATA, TrainImage, read_marker, scan_images
from sls_deploy.data.images import pixels_to_float
from sls_deploy.data.sources import resolve_images
from sls_deploy.data.stream import ordered_map, resolve_workers

FORMATS = ("png", "memmap")
Window = tuple[str, int, int, int, int]  # name, y, x, height, width


def window_starts(n: int, crop: int, step: int, thresh: int) -> list[tuple[int, int]]:
    """(start, size) of the windows along one axis of ``n`` pixels."""
    if crop <= 0 or n <= crop:
        return [(0, n)]
    starts = list(range(0, n - crop + 1, step))
    if n - (starts[-1] + crop) > thresh:
        starts.append(n - crop)
    return [(s, crop) for s in starts]


def windows(image: TrainImage, crop: int, step: int, thresh: int) -> list[Window]:
    stem = Path(image.name).stem
    rows = window_starts(image.height, crop, step, thresh)
    cols = window_starts(image.width, crop, step, thresh)
    out, k = [], 0
    for y, h in rows:
        for x, w in cols:
            k += 1
            out.append((f"{stem}_s{k:03d}.png", y, x, h, w))
    return out


def to_uint8(px: np.ndarray) -> np.ndarray:
    return px if px.dtype == np.uint8 else np.round(pixels_to_float(px) * 255.0).astype(np.uint8)


class _Cut:
    """One source image's windows (runs in a loader worker): PNG files written into ``folder``, or arrays."""

    def __init__(self, fmt: str, folder: Path, compress_level: int):
        self.fmt, self.folder, self.compress_level = fmt, folder, compress_level

    def __call__(self, job: tuple[TrainImage, list[Window]]) -> list[tuple[Window, np.ndarray | None]]:
        from PIL import Image

        image, wins = job
        px = to_uint8(image.pixels())
        if px.shape[:2] != (image.height, image.width):
            raise DataError(f"image {image.path} is {px.shape[1]}x{px.shape[0]} but its header said "
                            f"{image.width}x{image.height}")
        out = []
        for win in wins:
            name, y, x, h, w = win
            sub = np.ascontiguousarray(px[y:y + h, x:x + w])
            if self.fmt == "png":
                Image.fromarray(sub).save(self.folder / name, compress_level=self.compress_level)
                out.append((win, None))
            else:
                out.append((win, sub))
        return out


def _check_out(out: Path, source: Path | None) -> None:
    if source is not None:
        o, s = out.resolve(), source.resolve()
        if o == s or o in s.parents or s in o.parents:
            raise UsageError(f"the output folder {out} and the source {source} must not contain one another")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder for prepare-data's output")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DataError(f"cannot write {out}: {parent} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and read_marker(out) is None:
        raise DataError(f"{out} exists and was not written by prepare-data; choose another folder")


def _free_space(out: Path, need: int) -> None:
    parent = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise DataError(f"prepare-data needs about {need / 1e9:.1f} GB at {parent}, {free / 1e9:.1f} GB are free")


def prepare_data(source: str, out: Path, *, crop: int = 480, step: int = 240, thresh: int = 0, fmt: str = "png",
                 compress_level: int = 3, workers: int | str = "auto", progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Cut the images of ``source`` (a folder, a file, or a built-in list) and write them into ``out``."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if crop < 0 or step < 1 or thresh < 0 or not 0 <= compress_level <= 9:
        raise UsageError("crop must be >= 0, step >= 1, thresh >= 0 and compress level 0..9")
    out = Path(out)
    folder = Path(str(source))
    _check_out(out, folder if folder.exists() else None)
    t0 = time.perf_counter()
    images = scan_images(resolve_images(source))  # headers only: a bad file is named before any work
    jobs = [(im, windows(im, crop, step, thresh)) for im in images]
    names: dict[str, str] = {}
    for im, wins in jobs:
        for name, *_ in wins:
            if name in names:
                raise DataError(f"{im.name} and {names[name]} both give sub-image {name}; rename one")
            names[name] = im.name
    pixels = sum(h * w for _, wins in jobs for _, _, _, h, w in wins)
    need = pixels * 3 if fmt == "memmap" else int(sum(im.path.stat().st_size * sum(h * w for *_, h, w in wins)
                                                      / max(1, im.width * im.height) for im, wins in jobs))
    _free_space(out, int(need * 1.05))
    n = resolve_workers(workers, sum(im.decoded_bytes for im in images))
    log(f"prepare-data: {len(images)} images -> {len(names)} {'sub-images' if crop else 'images'} "
        f"({fmt}, {pixels * 3 / 1e9:.2f} GB of pixels) in {out}")
    index: list[tuple[str, int, int, int]] = []
    with atomic.atomic_dir(out) as tmp:
        cut = _Cut(fmt, tmp, compress_level)
        data = open(tmp / MEMMAP_DATA, "wb") if fmt == "memmap" else None
        try:
            offset = 0
            bar = tqdm(total=len(jobs), unit="image", desc="prepare-data", disable=not progress,
                       dynamic_ncols=True, mininterval=1.0)
            with bar:
                for result in ordered_map(cut, jobs, n):
                    for (name, _, _, h, w), sub in result:
                        if data is not None:
                            data.write(sub.tobytes())
                            index.append((name, offset, h, w))
                            offset += sub.nbytes
                    bar.update(1)
        finally:
            if data is not None:
                data.close()
        record = {"created_by": CREATED_BY, "version": 1, "format": fmt, "source": str(source),
                  "crop": crop, "step": step, "thresh": thresh, "images": len(images), "sub_images": len(names)}
        if fmt == "memmap":
            record["index"] = [list(e) for e in sorted(index)]  # name order, as a folder of the PNGs is read
        else:
            record["compress_level"] = compress_level
        atomic.write_json(tmp / MARKER, record)
    return {"out": str(out), "format": fmt, "images": len(images), "sub_images": len(names),
            "gigabytes": round(sum(p.stat().st_size for p in out.iterdir()) / 1e9, 3),
            "seconds": round(time.perf_counter() - t0, 1)}
