"""Where images come from: the bundled scikit-image lists, or a user's folder.

The bundled lists use real photographs that ship inside the scikit-image wheel (``skimage/data``).
No image is in both lists; the two motorcycle views (a stereo pair) are both in train so that no
near-duplicate leaks into eval. Synthetic or tiny images (chessboards, phantom, logo, horse silhouette,
microaneurysms, multipage TIFFs) are left out. Grayscale images are replicated to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

from sls_deploy.core.errors import DataError

SKIMAGE_TRAIN = (
    "coffee.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "rocket.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "color.png",
    "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png", "cell.png", "page.png", "text.png",
)
SKIMAGE_EVAL = ("astronaut.png", "chelsea.png", "camera.png")

BUILTIN_LISTS = {"skimage:train": SKIMAGE_TRAIN, "skimage:eval": SKIMAGE_EVAL}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("scikit-image is not installed; it provides the bundled images") from None
    return Path(skimage.__file__).parent / "data"


def resolve_images(spec: str | os.PathLike) -> list[Path]:
    """``skimage:train`` / ``skimage:eval`` or a folder of images -> sorted list of files."""
    spec = str(spec)
    if spec in BUILTIN_LISTS:
        root = skimage_data_dir()
        files = [root / name for name in BUILTIN_LISTS[spec]]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"scikit-image at {root} lacks {missing[0]} (needed by {spec}); "
                            "reinstall scikit-image>=0.22")
        return files
    if spec.startswith("skimage:"):
        raise DataError(f"unknown image list '{spec}' (known: {', '.join(BUILTIN_LISTS)})")
    folder = Path(spec)
    if not folder.exists():
        raise DataError(f"image folder not found: {folder}")
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in {folder}")
    return files
