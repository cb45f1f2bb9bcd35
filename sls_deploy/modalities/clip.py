"""Video super-resolution quality: per-frame PSNR/SSIM of any clip inference function against ground truth.

``infer`` maps an LR clip (1,T,3,h,w) tensor to an SR clip (1,T,3,sh,sw) tensor (or array). Every frame is
scored as ``evaluate`` scores an image: 8-bit quantized output vs 8-bit ground truth, ``crop_border`` = scale,
Y channel of BT.601 by default. A clip's score is the mean over its frames; the overall score is the mean over
clips. ``per_frame_mean`` averages frame t over the clips: for a recurrent model it shows how quality drifts
along the recurrence (a bidirectional model is usually weakest at the clip's two ends).

``ClipModality``: the ``clip`` modality (N,T,C,H,W windows of frames per graph run, BasicVSR; trained on clips,
with an optional frame-difference term in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from sls_deploy.core.bundle import digest
from sls_deploy.data.images import bicubic_up, quantize, to_image
from sls_deploy.data.metrics import psnr, ssim
from sls_deploy.data.video import ClipSampler, ClipSource, load_clip_pair, resolve_clips
from sls_deploy.core.errors import DataError
from sls_deploy.modalities.base import Feeds, Modality
from sls_deploy.modalities.losses import temporal_l1

ClipInferFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
CALIB_WINDOWS = 4  # INT8 calibration windows from the training clips
CALIB_CROP = 64  # LR crop (pixels) of each calibration window


@dataclass
class VideoQuality:
    psnr: float
    ssim: float
    per_clip: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # name -> {"psnr": [..], "ssim": [..]}
    per_frame_mean: list[float] = field(default_factory=list)  # PSNR of frame t, averaged over the clips
    per_frame_ssim_mean: list[float] = field(default_factory=list)

    def per_item_psnr(self) -> dict[str, float]:
        """Clip name -> PSNR averaged over its frames."""
        return {k: float(sum(v["psnr"]) / len(v["psnr"])) for k, v in self.per_clip.items()}


def _frames(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 5:
        a = a[0]
    return a


def _mean_over_clips(lists: list[list[float]]) -> list[float]:
    longest = max((len(v) for v in lists), default=0)
    return [float(np.mean([v[t] for v in lists if len(v) > t])) for t in range(longest)]


def evaluate_clips(infer: ClipInferFn, sources: Sequence[ClipSource], clip_len: int | None, scale: int,
                   channel: str = "y", with_ssim: bool = True, max_side: int | None = None) -> VideoQuality:
    """Score ``infer`` on the first ``clip_len`` frames of every clip (None: whole clips)."""
    if not sources:
        raise DataError("no evaluation clips")
    y = channel == "y"
    per: dict[str, dict[str, list[float]]] = {}
    for src in sources:
        hr, lr = load_clip_pair(src, clip_len, scale, max_side)
        with torch.no_grad():
            sr = infer(lr)
        sr_f, hr_f = _frames(sr), _frames(hr)
        if sr_f.shape != hr_f.shape:
            raise ValueError(f"{src.name}: output {tuple(sr_f.shape)} vs ground truth {tuple(hr_f.shape)}")
        entry: dict[str, list[float]] = {"psnr": [], "ssim": []}
        for t in range(len(hr_f)):
            sr_img, hr_img = quantize(to_image(sr_f[t])), quantize(to_image(hr_f[t]))
            entry["psnr"].append(float(psnr(sr_img, hr_img, crop_border=scale, y_channel=y)))
            if with_ssim:
                entry["ssim"].append(ssim(sr_img, hr_img, crop_border=scale, y_channel=y))
        per[src.name] = entry
    clips = list(per.values())
    return VideoQuality(
        psnr=float(np.mean([np.mean(v["psnr"]) for v in clips])),
        ssim=float(np.mean([np.mean(v["ssim"]) for v in clips])) if with_ssim else float("nan"),
        per_clip=per,
        per_frame_mean=_mean_over_clips([v["psnr"] for v in clips]),
        per_frame_ssim_mean=_mean_over_clips([v["ssim"] for v in clips]) if with_ssim else [])


def bicubic_clip_infer(scale: int) -> ClipInferFn:
    """Bicubic upscaling of every frame: the baseline a video model must beat."""

    def infer(lr: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = lr.shape
        return bicubic_up(lr.reshape(b * t, c, h, w), scale).reshape(b, t, c, h * scale, w * scale)

    return infer


class ClipModality(Modality):
    name, unit, validation = "clip", "frame", "video"

    def resolve_data(self, spec: str) -> list:
        return resolve_clips(spec)

    def sampler(self, recipe, spec: str, seed: int, section=None, degradation=None):
        """Clips of ``clip_len`` frames (the inputs are bicubic: ``degradation`` is not used)."""
        sec = section or recipe.finetune
        return ClipSampler(resolve_clips(spec), recipe.scale, sec.lr_patch, recipe.model.options["clip_len"],
                           sec.batch_size, seed=seed, workers=recipe.data_workers)

    def loss(self, temporal_weight: float):
        """L1 over every frame plus ``temporal_weight`` x L1 of frame-to-frame differences."""
        return temporal_l1(temporal_weight)

    def evaluate(self, infer: ClipInferFn, data: list, recipe, *, with_ssim: bool = True,
                 degradation=None) -> VideoQuality:
        """The first ``clip_len`` frames of every clip (bicubic inputs: ``degradation`` is not used)."""
        return evaluate_clips(infer, data, recipe.model.options["clip_len"], recipe.scale, recipe.metric_channel,
                              with_ssim=with_ssim)

    def baseline(self, recipe, degradation=None) -> tuple[str, ClipInferFn]:
        return "bicubic", bicubic_clip_infer(recipe.scale)

    def calibration_feeds(self, recipe, calib: str, data: str, input_name: str) -> tuple[Feeds, dict[str, str]]:
        """Windows of ``clip_len`` frames from the training clips (``calib`` is for images), cropped small."""
        clips = self.calibration_windows(recipe, data)
        return [{input_name: c} for c in clips], self.window_hashes(clips)

    def packed_eval_data(self, spec: str) -> list:
        return []  # video eval clips are not packed (they can be large): a device validates against its own clips

    @staticmethod
    def calibration_windows(recipe, data: str) -> list[np.ndarray]:
        """(1,T,3,h,w) LR windows: the first frames of up to CALIB_WINDOWS training clips, centre-cropped."""
        T = int(recipe.model.options.get("clip_len", 5))
        out = []
        for source in resolve_clips(data)[:CALIB_WINDOWS]:
            _, lr = load_clip_pair(source, T, recipe.scale)
            h, w = lr.shape[-2:]
            c = min(CALIB_CROP, h, w)
            top, left = (h - c) // 2, (w - c) // 2
            out.append(np.ascontiguousarray(lr[..., top:top + c, left:left + c].numpy().astype(np.float32)))
        return out

    @staticmethod
    def window_hashes(clips: list[np.ndarray]) -> dict[str, str]:
        return {f"window{i}": digest(c.tobytes().hex()[:4096] + str(c.shape)) for i, c in enumerate(clips)}
