"""The checks of a backend against the PyTorch reference at every shape, image by image or clip by clip.

The backends are ``infer`` functions over the runtime layer's runners (backends/runtime.py: Polygraphy's
``OnnxrtRunner`` on a ``ShrinkingSession``, or ``TrtRunner``), so the same checks score every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sls_deploy.core.memory import release_freed_memory


def _as_array(out) -> np.ndarray:
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


@dataclass
class ShapeResult:
    """One backend at one LR size, over the eval images, against the PyTorch reference and the ground truth."""

    label: str  # min / opt / max / odd / extra
    size: tuple[int, int]  # LR (H, W)
    backend: str  # e.g. "onnxruntime fp16"
    precision: str
    output_shape: tuple[int, ...]
    max_abs: float  # vs the PyTorch FP32 reference, [0, 1] outputs
    mean_abs: float
    psnr_vs_reference: float  # dB between backend and reference outputs (inf when identical)
    psnr_gt: float  # mean over images, on the report's channel
    ssim_gt: float
    reference_psnr_gt: float
    extended_images: int  # images mirror-extended to reach this size
    failures: list[str]

    @property
    def psnr_drop(self) -> float:
        return self.reference_psnr_gt - self.psnr_gt

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        def fin(v: float) -> float | None:  # JSON has no inf/nan: identical outputs have no finite PSNR
            return v if np.isfinite(v) else None

        return {"label": self.label, "lr_hw": list(self.size), "backend": self.backend, "precision": self.precision,
                "output_shape": list(self.output_shape), "max_abs": fin(self.max_abs), "mean_abs": fin(self.mean_abs),
                "psnr_vs_reference": fin(self.psnr_vs_reference), "psnr_gt": fin(self.psnr_gt),
                "ssim_gt": fin(self.ssim_gt), "reference_psnr_gt": self.reference_psnr_gt,
                "psnr_drop_db": fin(self.psnr_drop),
                "extended_images": self.extended_images, "passed": self.passed, "failures": self.failures}


@dataclass(frozen=True)
class Limits:
    max_psnr_drop_db: float
    max_abs: float | None = None  # only FP32 graphs are held to an absolute tolerance


def check_shapes(reference, backends: dict[str, tuple[str, object]], files: Sequence[Path], scale: int,
                 sizes: Sequence[tuple[str, tuple[int, int]]], channel: str, limits: dict[str, Limits],
                 progress=None, degradation=None) -> list[ShapeResult]:
    """Every backend ({name: (precision, infer)}) at every labelled LR size on every eval image.

    Images smaller than a size are mirror-extended (counted per row), so large profile shapes are checked on
    real content. A row fails when the output shape is wrong, the PSNR drop vs the reference exceeds the
    precision's limit, or (FP32) the max abs difference exceeds the tolerance.
    """
    y = channel == "y"
    results = []
    for label, hw in sizes:
        acc = {name: {"max": 0.0, "mean": [], "pref": [], "gt": [], "ssim": [], "shape": None} for name in backends}
        ref_gt, extended = [], 0
        for f in files:
            # one image at a time, its arrays gone before the next one's models run (at the profile's maximum the
            # reference and ground truth are 50 MB each, and every model run needs ~0.6 GB on top)
            ref_psnr, ext = _check_image(reference, backends, acc, f, scale, hw, y, degradation)
            ref_gt.append(ref_psnr)
            extended += ext
            if progress:
                progress()
        results += _rows(acc, backends, (1, 3, hw[0] * scale, hw[1] * scale), label, hw, ref_gt, extended, limits)
    return results


def _check_image(reference, backends: dict, acc: dict, file: Path, scale: int, hw: tuple[int, int], y: bool,
                 degradation) -> tuple[float, bool]:
    """The reference and every backend on one image at one LR size, scored into ``acc``; the reference's PSNR vs
    the ground truth, and whether the image was mirror-extended. Freed memory goes back to the OS before each
    model runs, so a run at the profile's maximum finds only what it needs resident."""
    from sls_deploy.data.images import pair_at_size, quantize, to_image
    from sls_deploy.data.metrics import psnr

    hr, lr, extended = pair_at_size(file, scale, hw, degradation)
    gt = quantize(to_image(hr))
    del hr
    release_freed_memory()
    with torch.no_grad():
        ref = np.clip(_as_array(reference(lr)), 0, 1).astype(np.float64)
    ref_psnr = psnr(quantize(to_image(ref)), gt, scale, y)
    for name, (_, infer) in backends.items():
        release_freed_memory()
        _score_into(acc[name], _as_array(infer(lr)), ref, gt, scale, y)
    return ref_psnr, extended


def _score_into(a: dict, out: np.ndarray, ref: np.ndarray, gt: np.ndarray, scale: int, y: bool) -> None:
    """One backend's output on one image: its difference from the reference, PSNR vs the reference, PSNR and
    SSIM vs the ground truth (nothing but the shape when the shape is wrong)."""
    from sls_deploy.data.images import quantize, to_image
    from sls_deploy.data.metrics import psnr, ssim

    out = _diff_into(a, out, ref)
    if out is None:
        return
    a["pref"].append(psnr(out[0].transpose(1, 2, 0) * 255.0, ref[0].transpose(1, 2, 0) * 255.0))
    img = quantize(to_image(out))
    a["gt"].append(psnr(img, gt, scale, y))
    a["ssim"].append(ssim(img, gt, scale, y))


def _diff_into(a: dict, out: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """Record a backend's output shape and its max / mean abs difference from the reference; the output clipped
    to [0, 1], or None when its shape differs (the row then fails on shape)."""
    a["shape"] = tuple(out.shape)
    if out.shape != ref.shape:
        return None
    out = np.clip(out, 0, 1).astype(np.float64)
    diff = np.abs(out - ref)
    a["max"] = max(a["max"], float(diff.max()))
    a["mean"].append(float(diff.mean()))
    return out


def _rows(acc: dict, backends: dict, want: tuple, label: str, hw, ref_gt: list, extended: int,
          limits: dict[str, Limits]) -> list[ShapeResult]:
    """One ShapeResult per backend from its accumulated differences, failing on shape, PSNR drop or max abs."""
    out = []
    for name, (precision, _) in backends.items():
        a = acc[name]
        fails = []
        if a["shape"] != want:
            fails.append(f"output shape {a['shape']} != {want}")
            out.append(ShapeResult(label, hw, name, precision, a["shape"] or (), float("nan"), float("nan"),
                                   float("nan"), float("nan"), float("nan"), float(np.mean(ref_gt)), extended, fails))
            continue
        r = ShapeResult(label, hw, name, precision, a["shape"], a["max"], float(np.mean(a["mean"])),
                        float(np.mean(a["pref"])), float(np.mean(a["gt"])), float(np.mean(a["ssim"])),
                        float(np.mean(ref_gt)), extended, fails)
        lim = limits[precision]
        if r.psnr_drop > lim.max_psnr_drop_db:
            fails.append(f"PSNR drop {r.psnr_drop:.3f} dB > {lim.max_psnr_drop_db} dB")
        if lim.max_abs is not None and r.max_abs > lim.max_abs:
            fails.append(f"max abs diff {r.max_abs:.2e} > {lim.max_abs:.0e}")
        out.append(r)
    return out


# --------------------------------------------------------------------------- clip checks


def clip_pair_at_size(source, clip_len: int, scale: int,
                      lr_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The first ``clip_len`` frames of a clip, every frame an HR centre crop of exactly ``lr_hw * scale``
    (mirror-extended when the clip is smaller: ``extended``), and their bicubic LR: (1,T,3,H,W), (1,T,3,h,w)."""
    from sls_deploy.data.images import bicubic_down
    from sls_deploy.data.video import read_frames

    frames = read_frames(source, 0, clip_len)  # (T, H, W, 3) uint8
    h, w = lr_hw[0] * scale, lr_hw[1] * scale
    H, W = frames.shape[1:3]
    extended = H < h or W < w
    if extended:
        ph, pw = max(0, h - H), max(0, w - W)
        frames = np.pad(frames, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
        H, W = frames.shape[1:3]
    y, x = (H - h) // 2, (W - w) // 2
    hr = torch.from_numpy(np.ascontiguousarray(frames[:, y:y + h, x:x + w])).permute(0, 3, 1, 2).float().div_(255.0)
    return hr.unsqueeze(0), bicubic_down(hr, scale).unsqueeze(0), extended


def check_clip_shapes(reference, backends: dict[str, tuple[str, object]], clips: Sequence, clip_len: int, scale: int,
                      sizes: Sequence[tuple[str, tuple[int, int]]], channel: str, limits: dict[str, Limits],
                      progress=None) -> list[ShapeResult]:
    """``check_shapes`` for clip functions (LR clip (1,T,3,h,w) -> SR clip (1,T,3,sh,sw)): every backend at every
    labelled LR size on the first ``clip_len`` frames of every eval clip (cropped or mirror-extended to the size),
    scored per frame; the means are over every frame of every clip. ``extended_images`` counts extended clips."""
    from sls_deploy.data.images import quantize, to_image
    from sls_deploy.data.metrics import psnr, ssim

    y = channel == "y"
    results = []
    for label, hw in sizes:
        acc = {name: {"max": 0.0, "mean": [], "pref": [], "gt": [], "ssim": [], "shape": None} for name in backends}
        ref_gt, extended = [], 0
        for src in clips:
            hr, lr, ext = clip_pair_at_size(src, clip_len, scale, hw)
            extended += ext
            gts = [quantize(to_image(f)) for f in hr[0]]
            ref = np.clip(_as_array(reference(lr)), 0, 1).astype(np.float64)
            ref_gt += [psnr(quantize(to_image(f)), g, scale, y) for f, g in zip(ref[0], gts)]
            for name, (_, infer) in backends.items():
                a = acc[name]
                out = _diff_into(a, _as_array(infer(lr)), ref)
                if out is None:
                    continue
                for f, r, g in zip(out[0], ref[0], gts):
                    a["pref"].append(psnr(f.transpose(1, 2, 0) * 255.0, r.transpose(1, 2, 0) * 255.0))
                    img = quantize(to_image(f))
                    a["gt"].append(psnr(img, g, scale, y))
                    a["ssim"].append(ssim(img, g, scale, y))
            if progress:
                progress()
        results += _rows(acc, backends, (1, clip_len, 3, hw[0] * scale, hw[1] * scale), label, hw, ref_gt, extended,
                         limits)
    return results
