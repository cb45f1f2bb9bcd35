"""Training images known by their headers: names and sizes are read before any pixel is decoded.

A training set is a list of ``TrainImage``: an image file (its size from the header: Pillow opens lazily) or
an entry of a memory-mapped cache written by ``sls-deploy prepare-data --format memmap`` (its size from the
cache's index). Samplers draw patch positions from the sizes alone; a worker reads the pixels (``pixels``)
only when a patch needs them, so a too-small, too-large or headerless image is named before training starts,
and a file whose pixel data is corrupt is named when it is met.

The memmap cache is one folder: ``images.u8`` (every image's H x W x 3 uint8 pixels, one after the other)
and ``prepare-data.json`` (what made it, and the index: name, byte offset, height, width per image).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sls_deploy.core.errors import DataError
from sls_deploy.data.images import check_image, read_pixels
from sls_deploy.data.sources import resolve_images

MARKER = "prepare-data.json"  # written by prepare-data into every folder it creates
CREATED_BY = "sls-deploy prepare-data"
MEMMAP_DATA = "images.u8"


@dataclass(frozen=True)
class TrainImage:
    """One training image: a file, or (``offset`` set) an entry of a memmap cache whose data file is ``path``."""

    name: str
    path: Path
    width: int
    height: int
    offset: int | None = None

    def pixels(self) -> np.ndarray:
        """H x W x 3 pixels in the file's own type (``images.read_pixels``); a cache entry is a read-only uint8
        memmap view: only the rows a crop touches are read, and they leave memory with the view."""
        if self.offset is None:
            return read_pixels(self.path)
        if not self.path.is_file():
            raise DataError(f"memmap cache data not found: {self.path}")
        try:
            return np.memmap(self.path, np.uint8, "r", self.offset, (self.height, self.width, 3))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {self.name} from memmap cache {self.path}: {str(e)[:120]}") from None

    @property
    def cached(self) -> bool:
        """Pixels already memory-mapped (no decoding to cache)."""
        return self.offset is not None

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * 3


def scan_images(files: Sequence[str | os.PathLike | TrainImage]) -> list[TrainImage]:
    """``TrainImage`` of every file from its header (``images.check_image``: the size as shown, after the EXIF
    orientation; entries given as ``TrainImage`` are kept); a missing file, an unreadable header, an image of
    several frames or one above ``images.MAX_IMAGE_PIXELS`` is named here."""
    out = []
    for f in files:
        if isinstance(f, TrainImage):
            out.append(f)
            continue
        path = Path(f)
        if not path.is_file():
            raise DataError(f"image not found: {path}")
        info = check_image(path)
        out.append(TrainImage(path.name, path, info.width, info.height))
    return out


def read_marker(folder: Path) -> dict | None:
    """prepare-data's record of a folder it wrote; None when it has none (or an unreadable one)."""
    try:
        rec = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("created_by") == CREATED_BY else None


def memmap_images(folder: Path, rec: dict) -> list[TrainImage]:
    """The entries of a memmap cache folder, checked against its data file's size."""
    data = Path(folder) / MEMMAP_DATA
    try:
        entries = [(str(n), int(o), int(h), int(w)) for n, o, h, w in rec["index"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"memmap cache {folder}: {MARKER} has no valid index; write it again with prepare-data") \
            from None
    if not entries:
        raise DataError(f"memmap cache {folder} holds no images")
    size = data.stat().st_size if data.is_file() else -1
    end = max(o + h * w * 3 for _, o, h, w in entries)
    if size < end or any(o < 0 or h < 1 or w < 1 for _, o, h, w in entries):
        raise DataError(f"memmap cache {folder}: {MEMMAP_DATA} is {'missing' if size < 0 else f'{size} bytes'}, "
                        f"its index needs {end}; write it again with prepare-data")
    return [TrainImage(n, data, w, h, o) for n, o, h, w in entries]


def training_images(spec: str | os.PathLike) -> list[TrainImage]:
    """A data spec (``skimage:train``, a folder or file of images, or a prepare-data memmap cache folder) ->
    its training images, sizes from headers or the cache's index."""
    folder = Path(str(spec))
    if folder.is_dir() and (rec := read_marker(folder)) is not None and rec.get("format") == "memmap":
        return memmap_images(folder, rec)
    return scan_images(resolve_images(spec))


__all__ = ["CREATED_BY", "MARKER", "MEMMAP_DATA", "TrainImage", "memmap_images", "read_marker",
           "scan_images", "training_images"]
