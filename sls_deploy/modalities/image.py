"""Restoration quality on an image list: PSNR/SSIM of any inference function against ground truth.

``infer`` maps a 1x3xhxw LR (input) tensor to a 1x3x(sh)x(sw) SR (output) tensor (or array), so the same code
scores PyTorch, ONNX Runtime and TensorRT outputs, and the degradation's baseline (bicubic upscaling for SR,
the blurred input itself for deblurring). The inputs are made by the model's degradation (default: bicubic
downscaling by ``scale``), deterministically per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sls_deploy.core.device import model_device
from sls_deploy.data.degradations import BicubicDown, Degradation
from sls_deploy.data.images import load_pair, quantize, to_image
from sls_deploy.data.metrics import psnr, ssim

InferFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass
class QualityResult:
    psnr: float
    ssim: float
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)


def evaluate(infer: InferFn, files: Sequence[Path], scale: int, channel: str = "y",
             with_ssim: bool = True, degradation: Degradation | None = None) -> QualityResult:
    """Mean (and per-image) PSNR/SSIM of ``infer`` on ``files``, border of ``scale`` pixels cropped."""
    y = channel == "y"
    per: dict[str, dict[str, float]] = {}
    for f in files:
        hr, lr = load_pair(f, scale, degradation)
        with torch.no_grad():
            sr = infer(lr)
        sr_img, hr_img = quantize(to_image(sr)), quantize(to_image(hr))
        if sr_img.shape != hr_img.shape:
            raise ValueError(f"{Path(f).name}: output {sr_img.shape} vs ground truth {hr_img.shape}")
        entry = {"psnr": float(psnr(sr_img, hr_img, crop_border=scale, y_channel=y))}
        if with_ssim:
            entry["ssim"] = ssim(sr_img, hr_img, crop_border=scale, y_channel=y)
        per[Path(f).name] = entry
    return QualityResult(
        psnr=float(np.mean([v["psnr"] for v in per.values()])),
        ssim=float(np.mean([v.get("ssim", float("nan")) for v in per.values()])),
        per_image=per)


def baseline_infer(degradation: Degradation) -> InferFn:
    """The degradation's trivial restoration (bicubic upscaling, the blurred input, ...); its label in reports
    is ``degradation.name``."""
    return degradation.baseline


def bicubic_infer(scale: int) -> InferFn:
    """The bicubic baseline of SR models (``baseline_infer(BicubicDown(scale))``)."""
    return baseline_infer(BicubicDown(scale))


def torch_infer(model: torch.nn.Module) -> InferFn:
    """The model as an InferFn: the input moved to the model's device, the output back on the CPU."""
    model.eval()
    device = model_device(model)
    return lambda lr: model(lr.to(device)).cpu()
