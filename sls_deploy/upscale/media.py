"""The user's inputs (image files, video files, folders of either) and the outputs written for them.

Every input is checked before anything runs, from its header: a missing or unreadable file, an unsupported
extension, an animated or multi-page image, an image above the pixel limit, one smaller than the model's minimum,
a video with no frames or an out-of-range frame rate, or two inputs that would write the same output name is a
one-line error, and no output is written (where outputs may go: ``outputs``). Outputs take their final name only
when complete (atomic rename), so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.errors import DataError, UsageError
from sls_deploy.data.images import check_image, dims, read_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
MAX_FPS = 240  # the fastest real-time rate of common cameras; faster clips are slow-motion captures to re-time


@dataclass(frozen=True)
class Job:
    """One input and the file it becomes."""

    source: Path
    kind: str  # "image" | "video"
    output: Path
    note: str | None = None  # what reading it does that the user should know (EXIF rotation)


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def _check_min(path: Path, what: str, width: int, height: int, min_size: int) -> None:
    if min(width, height) < min_size:
        raise DataError(f"{path}: {what} {dims(width, height)}, smaller than the model's minimum input of "
                        f"{min_size} px per side")


def collect(inputs: list[str], out_dir: Path, min_size: int = 1) -> list[Job]:
    """Jobs for the given files and folders (a folder: its image and video files, sorted), all checked."""
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
        elif p.exists():
            raise DataError(f"input {p} is not a regular file")
        else:
            raise DataError(f"input not found: {p}")
    jobs, names = [], {}
    for f in files:
        kind = _kind(f)
        out = out_dir / (f.stem + (".png" if kind == "image" else ".mp4"))
        if out.name in names:
            raise UsageError(f"{names[out.name]} and {f} would both write {out}; upscale them into different folders")
        names[out.name] = f
        note = None
        if kind == "image":
            info = check_image(f)
            _check_min(f, "the image is", info.width, info.height, min_size)
            note = info.orientation_note
        else:
            video = video_info(f)
            _check_min(f, "a video whose frames are", *video.size, min_size)
        jobs.append(Job(f, kind, out, note))
    return jobs


def read_image(path: Path) -> np.ndarray:
    return read_rgb(path)


def write_png(path: Path, img: np.ndarray) -> str:
    """Write ``img`` as a PNG under ``path`` (atomically); returns its sha256.

    Encoded in memory, then written by us: when imageio's plugin holds the file, a full disk fails its close and
    its ``__del__`` closes again at exit, printing an "Exception ignored ... No space left" traceback after the
    one-line error."""
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", img, extension=".png")
    atomic.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int
    size: tuple[int, int]  # (W, H)


def _ffmpeg_fps(path: Path) -> float:
    """The frame rate ffmpeg states for the video stream, read from its own header print-out. imageio-ffmpeg
    cannot parse the "1k fps" ffmpeg prints for multiples of 1000 (it reports 0)."""
    import subprocess

    from imageio_ffmpeg import get_ffmpeg_exe

    try:
        text = subprocess.run([get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True,
                              timeout=60, text=True, errors="replace").stderr
    except (OSError, subprocess.SubprocessError):
        return 0.0
    video = next((line for line in text.splitlines() if "Video:" in line), "")
    for unit in ("fps", "tbr"):  # the stated rate, else ffmpeg's guess from the time base
        m = re.search(rf"[ ,]([0-9]+(?:\.[0-9]+)?)(k?) {unit}\b", video)
        if m:
            return float(m.group(1)) * (1000 if m.group(2) else 1)
    return 0.0


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
    if fps == 0:
        fps = _ffmpeg_fps(path)
    if not fps or not np.isfinite(fps):
        raise DataError(f"video {path} states no frame rate")
    if not 0 < fps <= MAX_FPS:
        raise DataError(f"video {path} states a frame rate of {fps:g} fps, outside the supported range (up to "
                        f"{MAX_FPS} fps); re-time it first (e.g. ffmpeg -i IN -r 30 OUT)")
    if not n:
        raise DataError(f"video {path} has no frames")
    size = tuple(meta.get("size", (0, 0)))
    return VideoInfo(fps, int(n), size)


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """H x W x 3 float32 frames in [0, 1]."""
    import imageio.v2 as iio2

    with iio2.get_reader(str(path), "ffmpeg") as r:
        for frame in r:
            yield np.asarray(frame)[:, :, :3].astype(np.float32) / 255.0


class VideoWriter:
    """An mp4 (H.264 through imageio-ffmpeg) at ``fps`` into ``path``, whatever its name (the container is stated,
    not guessed from the extension), so that it can be ``atomic_path``'s temporary file; closed and checked on
    leaving the ``with`` block.

    imageio-ffmpeg does not look at ffmpeg's exit status: an encoder that failed (on a full disk) left a cut,
    unplayable file and no error. So ffmpeg is quiet (its errors would be lines of its own on the user's
    terminal) and the finished file is read back (stream copy, nothing decoded) for its frame count: a file short
    of frames is an OSError (``atomic_path`` names a full disk for what it is)."""

    def __init__(self, path: Path, fps: float):
        import imageio.v2 as iio2

        self.path, self.frames = path, 0
        self._w = iio2.get_writer(str(path), ".mp4", fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                  ffmpeg_log_level="quiet", output_params=["-f", "mp4"])

    def append(self, frame: np.ndarray) -> None:
        self._w.append_data(frame)
        self.frames += 1

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            self._w.close()
        except Exception:
            if kind is None:  # else the first error is the one to report
                raise
            return
        if kind is None:
            from imageio_ffmpeg import count_frames_and_secs

            try:
                written = count_frames_and_secs(str(self.path))[0]
            except (RuntimeError, OSError, ValueError):  # not a readable video: ffmpeg stopped early
                written = 0
            if written != self.frames:
                raise OSError(f"ffmpeg wrote {written} of {self.frames} frames (the encoder failed)")
