"""INT8 calibration images: the package's built-in set (calib/) and any folder of images, read as LR model inputs.

Here, in data/, so that the image modality (which owns its calibration feeds) reads them without importing the
ONNX layer above it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sls_deploy.core.atomic import sha256_file
from sls_deploy.core.errors import DataError
from sls_deploy.data.images import check_pixels, read_rgb
from sls_deploy.data.sources import IMAGE_SUFFIXES

BUILTIN_CALIB = Path(__file__).resolve().parent.parent / "calib"

MAX_CALIB_PIXELS = 2**20  # one LR calibration image (1 MP): activations of every conv are kept per image


def read_calibration_images(folder: str | os.PathLike, min_size: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """LR calibration inputs (1x3xHxW float32) from a folder, with each file's sha256 (for the cache key)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder {folder} holds no images")
    images, hashes = [], {}
    for f in files:
        check_pixels(f, MAX_CALIB_PIXELS, "calibration image")
        img = read_rgb(f)
        if min(img.shape[:2]) < min_size:
            raise DataError(f"calibration image {f.name} ({img.shape[1]}x{img.shape[0]}) is smaller than the "
                            f"model's minimum input {min_size}x{min_size}")
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)[None]).astype(np.float32))
        hashes[f.name] = sha256_file(f)
    return images, hashes
