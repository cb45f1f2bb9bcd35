"""The candidates a router chooses between, each a batched PyTorch function on LR patches with its cost.

A candidate's cost is its MACs as a fraction of the dense model's at the same input size (convolutional models:
the fraction does not depend on the size): a member bundle's plan ratio, 1 for the dense base model, and for
bicubic upscaling its 4x4-tap interpolation counted as 16 MACs per output pixel and channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sls_deploy.core.bundle import PLAN, WEIGHTS
from sls_deploy.core.device import model_device
from sls_deploy.core.errors import BundleError

Run = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    name: str
    cost: float  # MACs / dense MACs at the same input size
    run: Run     # (N, 3, h, w) in [0, 1] -> (N, 3, h*s, w*s)


def module_candidate(name: str, module: torch.nn.Module, cost: float, batch: int = 16) -> Candidate:
    """A module as a candidate: batches run on the module's device, outputs come back to the CPU."""
    module = module.eval()
    device = model_device(module)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([module(x[i:i + batch].to(device)).cpu() for i in range(0, x.shape[0], batch)], dim=0)

    return Candidate(name, float(cost), run)


def bicubic_candidate(scale: int, dense_macs_per_lr_pixel: float, degradation_baseline: Run) -> Candidate:
    macs = 16 * 3 * scale * scale  # 4x4 taps, 3 channels, scale^2 output pixels per LR pixel
    return Candidate("bicubic", macs / dense_macs_per_lr_pixel, degradation_baseline)


def bundle_candidate(root, recipe, name: str | None = None, device=None) -> Candidate:
    """A finished image bundle's PyTorch model (on ``device``) as a candidate, its cost the plan's MACs ratio."""
    from pathlib import Path

    from sls_deploy.backends.loading import bundle_module
    from sls_deploy.pruning.registry import load_plan

    root = Path(root)
    for f in (PLAN, WEIGHTS):
        if not (root / f).is_file():
            raise BundleError(f"{root} has no {f}: not a finished bundle")
    return module_candidate(name or root.name, bundle_module(root, recipe, device), load_plan(root / PLAN).ratio)
