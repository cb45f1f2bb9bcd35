"""The user's inputs (image files, video files, folders of either) and the outputs written for them.

Everything is checked before anything runs: a missing or unreadable file, an unsupported extension, two inputs
that would write the same output name, or an output path that is a file is a one-line error, and no output is
written. Outputs take their final name only when complete (atomic rename), so an interrupted run leaves no
half-written file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.errors import DataError, UsageError
from sls_deploy.data.images import image_size, read_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm")


@dataclass(frozen=True)
class Job:
    """One input and the file it becomes."""

    source: Path
    kind: str  # "image" | "video"
    output: Path


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def collect(inputs: list[str], out_dir: Path) -> list[Job]:
    """Jobs for the given files and folders (a folder: its image and video files, sorted), all checked."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output folder {out_dir} is a file")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and _kind(f))
            if not found:
                raise DataError(f"folder {p} holds no image or video file ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})")
            files += found
        elif p.is_file():
            if _kind(p) is None:
                raise UsageError(f"{p}: unsupported extension '{p.suffix}' (images: {', '.join(IMAGE_EXTS)}; "
                                 f"videos: {', '.join(VIDEO_EXTS)})")
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    jobs, names = [], {}
    for f in files:
        kind = _kind(f)
        out = out_dir / (f.stem + (".png" if kind == "image" else ".mp4"))
        if out.name in names:
            raise UsageError(f"{names[out.name]} and {f} would both write {out}; upscale them into different folders")
        names[out.name] = f
        if kind == "image" and image_size(f) is None:
            raise DataError(f"cannot read image {f}: not an image file, or corrupt")
        if kind == "video":
            video_info(f)  # raises on an unreadable file
        jobs.append(Job(f, kind, out))
    return jobs


def read_image(path: Path) -> np.ndarray:
    return read_rgb(path)


def write_png(path: Path, img: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic.atomic_path(path) as tmp:
        iio.imwrite(tmp, img, extension=".png")


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int | None  # None when the container does not say
    size: tuple[int, int]  # (W, H)


def video_info(path: Path) -> VideoInfo:
    import imageio.v2 as iio2

    try:
        with iio2.get_reader(str(path), "ffmpeg") as r:
            meta = r.get_meta_data()
            n = r.count_frames()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read video {path}: {first}") from None
    fps = float(meta.get("fps") or 0)
    if not fps or not np.isfinite(fps):
        raise DataError(f"video {path} states no frame rate")
    return VideoInfo(fps, int(n) if n else None, tuple(meta.get("size", (0, 0))))


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """H x W x 3 float32 frames in [0, 1]."""
    import imageio.v2 as iio2

    with iio2.get_reader(str(path), "ffmpeg") as r:
        for frame in r:
            yield np.asarray(frame)[:, :, :3].astype(np.float32) / 255.0


class VideoWriter:
    """An mp4 (H.264 through imageio-ffmpeg) at ``fps``, written beside ``path`` under a temporary name and renamed
    to ``path`` by ``close()`` only (``close(ok=False)`` removes it)."""

    def __init__(self, path: Path, fps: float):
        import imageio.v2 as iio2

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames = path, 0
        self._tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.mp4"  # ffmpeg picks the container by extension
        self._w = iio2.get_writer(str(self._tmp), "ffmpeg", fps=fps, codec="libx264", quality=8,
                                  macro_block_size=1, ffmpeg_log_level="error")

    def append(self, frame: np.ndarray) -> None:
        self._w.append_data(frame)
        self.frames += 1

    def close(self, ok: bool = True) -> None:
        try:
            self._w.close()
            if ok:
                os.chmod(self._tmp, 0o666 & ~atomic.current_umask())
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()
