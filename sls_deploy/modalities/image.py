"""Restoration quality on an image list: PSNR/SSIM of any inference function against ground truth.

``infer`` maps a 1x3xhxw LR (input) tensor to a 1x3x(sh)x(sw) SR (output) tensor (or array), so the same code
scores PyTorch, ONNX Runtime and TensorRT outputs, and the degradation's baseline (bicubic upscaling for SR,
the blurred input itself for deblurring). The inputs are made by the model's degradation (default: bicubic
downscaling by ``scale``), deterministically per image.

``ImageModality``: the ``image`` modality (N,C,H,W images; random aligned LR/HR patches, L1 loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sls_deploy.core.bundle import digest
from sls_deploy.core.device import model_device
from sls_deploy.data.calibration import BUILTIN_CALIB, read_calibration_images
from sls_deploy.data.catalog import training_images
from sls_deploy.data.degradations import BicubicDown, Degradation
from sls_deploy.data.images import load_pair, quantize, to_image
from sls_deploy.data.metrics import psnr, ssim
from sls_deploy.data.patches import PatchSampler
from sls_deploy.data.sources import resolve_images
from sls_deploy.modalities.base import Feeds, Modality

InferFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass
class QualityResult:
    psnr: float
    ssim: float
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)

    def per_item_psnr(self) -> dict[str, float]:
        """Image name -> PSNR."""
        return {k: v["psnr"] for k, v in self.per_image.items()}


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


class ImageModality(Modality):
    name, unit, validation = "image", "image", "image"

    def resolve_data(self, spec: str) -> list:
        return resolve_images(spec)

    def sampler(self, recipe, spec: str, seed: int, section=None, degradation=None):
        sec = section or recipe.finetune
        return PatchSampler(training_images(spec), recipe.scale, sec.lr_patch, sec.batch_size, seed=seed,
                            degradation=degradation or recipe.adapter.degradation(recipe.model),
                            workers=recipe.data_workers)

    def loss(self, temporal_weight: float):
        return None

    def evaluate(self, infer: InferFn, data: list, recipe, *, with_ssim: bool = True,
                 degradation: Degradation | None = None) -> QualityResult:
        return evaluate(infer, data, recipe.scale, recipe.metric_channel, with_ssim=with_ssim,
                        degradation=degradation or recipe.adapter.degradation(recipe.model))

    def baseline(self, recipe, degradation: Degradation | None = None) -> tuple[str, InferFn]:
        degradation = degradation or recipe.adapter.degradation(recipe.model)
        return degradation.name, baseline_infer(degradation)

    def calibration_feeds(self, recipe, calib: str, data: str, input_name: str) -> tuple[Feeds, dict[str, str]]:
        """The LR images of the calibration folder; for a same-size degradation (deblurring) those images
        degraded by the model's degradation, one fixed seed per image."""
        folder = BUILTIN_CALIB if calib == "builtin" else Path(calib)
        images, hashes = read_calibration_images(folder, recipe.adapter.min_input_size(recipe.model))
        if recipe.scale == 1:  # a same-size degradation (deblurring): the model's inputs are degraded images
            deg = recipe.adapter.degradation(recipe.model)
            images = [deg.degrade_tensor(torch.from_numpy(img), rng=i).numpy().astype(np.float32)
                      for i, img in enumerate(images)]
            hashes = {**hashes, "degradation": digest(deg.describe())}
        return [{input_name: img} for img in images], hashes

    def packed_eval_data(self, spec: str) -> list:
        return resolve_images(spec)
