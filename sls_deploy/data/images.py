"""Reading images and making low-resolution inputs.

Arrays are float32 HWC RGB in [0, 1]; tensors are NCHW. Grayscale is replicated to three channels and an
alpha channel is dropped, because the models are RGB-in/RGB-out.

Images are read as users see them: the EXIF orientation is applied (a phone photo stored sideways comes out
upright), and a file of several frames (animated GIF/APNG/WebP, multi-page TIFF, whatever its extension) is
refused rather than cut to its first frame. ``read_rgb`` is the one reader for training, evaluation, calibration
and ``upscale``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sls_deploy.core.errors import DataError
from sls_deploy.data.degradations import Degradation, default_degradation
from sls_deploy.data.resize import bicubic_down, bicubic_up, to_image, to_tensor  # noqa: F401 (re-exported)


MAX_IMAGE_PIXELS = 64 * 2**20  # any image read: larger ones are refused (a decompression bomb, or no photo we need)
CONVERTED_MODES = {"CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV", "P": "palette"}


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> (what a viewer does to the stored pixels, the same on an H x W x C array). These are the
# transposes of Pillow's ImageOps.exif_transpose (tests/test_data.py checks all eight against it), applied to the
# decoded array because 16-bit and float images are decoded by imageio/tifffile, not Pillow.
ORIENTATIONS = {
    2: ("mirrored left-right", lambda a: a[:, ::-1]),
    3: ("rotated 180 degrees", lambda a: a[::-1, ::-1]),
    4: ("mirrored top-bottom", lambda a: a[::-1]),
    5: ("transposed (mirrored, rotated 90 degrees counter-clockwise)", lambda a: a.swapaxes(0, 1)),
    6: ("rotated 90 degrees clockwise", lambda a: np.rot90(a, -1)),
    7: ("transversed (mirrored, rotated 90 degrees clockwise)", lambda a: a[::-1, ::-1].swapaxes(0, 1)),
    8: ("rotated 90 degrees counter-clockwise", lambda a: np.rot90(a, 1)),
}


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says. ``width`` x ``height`` is the size as shown, after the EXIF orientation."""

    width: int
    height: int
    mode: str
    frames: int  # 1 for a still image; an MPO (a camera JPEG with previews) counts its primary image only
    orientation: int  # EXIF orientation 1..8 (1: as stored)
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def orientation_note(self) -> str | None:
        """"rotated per its EXIF orientation (6: rotated 90 degrees clockwise)", or None when shown as stored."""
        if self.orientation not in ORIENTATIONS:
            return None
        return f"rotated per its EXIF orientation ({self.orientation}: {ORIENTATIONS[self.orientation][0]})"


def dims(width: int, height: int) -> str:
    """An image size that cannot be misread: "7 px wide x 3 px tall"."""
    return f"{width} px wide x {height} px tall"


@contextlib.contextmanager
def _header_only() -> Iterator[None]:
    """Pillow refuses to even open a file above twice its MAX_IMAGE_PIXELS (a decompression bomb); only the header
    is read here, and the callers refuse large images with their own, lower, limit, naming it."""
    from PIL import Image

    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def probe(path: str | os.PathLike) -> ImageInfo:
    """The header of an image file (Pillow; no pixel is decoded). One-line DataError if it is not an image."""
    from PIL import Image

    try:
        with _header_only(), Image.open(path) as im:
            frames = 1 if im.format == "MPO" else int(getattr(im, "n_frames", 1) or 1)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
            w, h = im.size
            mode, fmt = im.mode, im.format or "?"
    except Exception:
        raise DataError(f"cannot read image {path}: not an image file, or corrupt") from None
    if orientation >= 5:  # shown turned by 90 degrees
        w, h = h, w
    return ImageInfo(w, h, mode, frames, orientation, fmt)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as shown (after the EXIF orientation), from the file's header; None if unknown."""
    try:
        info = probe(path)
    except DataError:
        return None
    return info.width, info.height


def check_image(path: str | os.PathLike, limit: int = MAX_IMAGE_PIXELS, what: str = "image") -> ImageInfo:
    """The header of an image ``read_rgb`` will read, checked before any pixel is decoded: an image file of one
    frame, at most ``limit`` pixels. One-line DataError otherwise."""
    info = probe(path)
    if info.frames > 1:
        raise DataError(f"{what} {path} holds {info.frames} frames (an animation or a multi-page file); only still "
                        "images are read, never just a first frame: save each frame you want as its own file")
    _check_limit(path, info, limit, what)
    return info


def _check_limit(path: str | os.PathLike, info: ImageInfo, limit: int, what: str) -> None:
    if info.pixels > limit:
        raise DataError(f"{what} {Path(path).name} is {info.width}x{info.height} ({info.pixels / 2**20:.1f} MP), "
                        f"above the limit of {limit / 2**20:.1f} MP; downscale or crop it")


def check_pixels(path: str | os.PathLike, limit: int, what: str) -> None:
    """Refuse an image above ``limit`` pixels before it is decoded, naming the limit."""
    try:
        info = probe(path)
    except DataError:
        return  # not readable: the reader says so
    _check_limit(path, info, limit, what)


def check_eval_size(path: str | os.PathLike, scale: int, min_lr: int) -> None:
    """An eval image must give an LR input the model accepts and leave SSIM's 11x11 window after the border
    crop of ``scale`` pixels."""
    size = image_size(path)
    need = max(scale * min_lr, 11 + 2 * scale)
    if size and min(size) < need:
        raise DataError(f"eval image {Path(path).name} is {dims(*size)}; evaluation needs at least {need} px on each "
                        f"side (LR >= {min_lr} px at x{scale}, SSIM's 11x11 window after a {scale}-px border)")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image as shown (EXIF orientation applied): H x W x 3 float32 in [0, 1]."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    info = check_image(path)
    try:
        if info.mode in CONVERTED_MODES:  # colour models imageio would hand over as raw channels (CMYK read as RGBA)
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        else:
            img = np.asarray(iio.imread(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read image {path}: {first}") from None
    if img.ndim in (2, 3) and info.orientation in ORIENTATIONS:
        img = ORIENTATIONS[info.orientation][1](img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.ndim == 3 and img.shape[2] in (1, 2):  # gray, or gray + alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"image {path} has shape {img.shape}; expected H x W (gray), H x W x 3 or H x W x 4")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(img.astype(np.float32), 0.0, 1.0)
    raise DataError(f"image {path} has unsupported pixel type {img.dtype}")


def conversion_note(path: str | os.PathLike) -> str | None:
    """What ``read_rgb`` does to this file (orientation, channels), when it is not plain RGB as stored (for
    reports)."""
    import imageio.v3 as iio

    try:
        info = probe(path)
    except DataError:
        return None
    notes = [info.orientation_note] if info.orientation_note else []
    if info.mode in CONVERTED_MODES:
        notes.append(f"{CONVERTED_MODES[info.mode]}, converted to RGB (Pillow)")
    else:
        try:
            shape = iio.improps(path).shape
        except Exception:
            shape = ()
        if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
            notes.append("grayscale, replicated to RGB")
        elif len(shape) == 3 and shape[2] == 2:
            notes.append("grayscale + alpha: alpha dropped, gray replicated to RGB")
        elif len(shape) == 3 and shape[2] == 4:
            notes.append("RGBA: alpha dropped")
    return "; ".join(notes) or None


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of ``scale`` (so HR = scale * LR exactly)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def quantize(img: np.ndarray) -> np.ndarray:
    """[0,1] float -> the 8-bit values a saved PNG would hold, as float64 in [0, 255] (for metrics)."""
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.float64)


def pair_at_size(path: str | os.PathLike, scale: int, lr_hw: tuple[int, int],
                 degradation: Degradation | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """An HR centre crop of exactly ``lr_hw * scale`` and its input (``degradation``, default bicubic
    downscaling by ``scale``; a random one uses the image's evaluation seed); ``extended`` is True when the
    image was smaller and had to be mirror-extended (symmetric padding) to reach that size."""
    deg = default_degradation(scale, degradation)
    h, w = lr_hw[0] * scale, lr_hw[1] * scale
    img = read_rgb(path)
    H, W = img.shape[:2]
    extended = H < h or W < w
    if extended:
        ph, pw = max(0, h - H), max(0, w - W)
        img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
        H, W = img.shape[:2]
    y, x = (H - h) // 2, (W - w) // 2
    hr = to_tensor(img[y:y + h, x:x + w])
    return hr, deg.degrade_tensor(hr, deg.eval_seed(Path(path).name)), extended


def load_pair(path: str | os.PathLike, scale: int,
              degradation: Degradation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HR image (mod-cropped) and its input, both 1x3xHxW tensors: ``degradation`` of the HR (default: bicubic
    downscaling by ``scale``); a random degradation uses the image's evaluation seed (from its file name), so
    the pair is the same every time."""
    deg = default_degradation(scale, degradation)
    hr = to_tensor(mod_crop(read_rgb(path), scale))
    if hr.shape[-1] < scale or hr.shape[-2] < scale:
        raise DataError(f"image {path} is smaller than the scale factor {scale}")
    return hr, deg.degrade_tensor(hr, deg.eval_seed(Path(path).name))

