"""The PyTorch side of the runtime: a recipe's model with base or bundle weights, at a plan's widths, and the
graph spec of its ONNX export. Build stages (stages/) and inference (upscale, route) load models here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sls_deploy.config.recipe import Recipe
from sls_deploy.core.checkpoints import load_weights, read_state_dict
from sls_deploy.core.errors import CheckpointError
from sls_deploy.models import ModelConfig

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def resolve_base_weights(recipe: Recipe, override: str | None) -> Path:
    if override:
        return Path(override)
    if not recipe.base_weights:
        raise CheckpointError(f"recipe '{recipe.name}' names no base_weights; pass --weights PATH")
    p = Path(recipe.base_weights)
    if p.is_absolute() or p.parent != Path("."):
        return p if p.is_absolute() else Path(recipe.path).parent / p
    return WEIGHTS_DIR / p


def model_config(recipe: Recipe, widths: dict[str, int] | None) -> ModelConfig:
    """The recipe's model with the given channel-group widths (a channel plan's); None: dense."""
    if not widths:
        return recipe.model
    return dataclasses.replace(recipe.model, options={**recipe.model.options, "widths": dict(widths)})


def load_model(recipe: Recipe, weights: Path, widths: dict[str, int] | None = None,
               device: torch.device | str | None = None) -> torch.nn.Module:
    """The recipe's model (at ``widths``) with ``weights`` loaded: foreign layouts converted, safe loading, fit
    checked (a checkpoint of another width is a one-line CheckpointError naming the first mismatching key);
    on ``device`` (the CPU when None)."""
    cfg = model_config(recipe, widths)
    model = recipe.adapter.build(cfg)
    sd = recipe.adapter.convert_state_dict(read_state_dict(weights), cfg)
    what = recipe.describe_model() + (" at the plan's widths" if widths else "")
    load_weights(model, sd, what)
    return model.to(device or "cpu").eval()


def plan_widths(plan) -> dict[str, int] | None:
    """A channel plan's widths; None for an N:M plan (the dense architecture, masked weights)."""
    return getattr(plan, "widths", None)


def bundle_module(root: Path, recipe: Recipe, device: torch.device | str | None = None) -> torch.nn.Module:
    """A finished bundle's finetuned weights at its plan's widths, as the adapter's export module (eval mode), on
    ``device`` (the CPU when None)."""
    from sls_deploy.core.bundle import PLAN, WEIGHTS
    from sls_deploy.pruning.registry import load_plan

    root = Path(root)
    model = load_model(recipe, root / WEIGHTS, plan_widths(load_plan(root / PLAN)), device)
    return recipe.adapter.export_module(model).eval()


def graph_spec(recipe: Recipe):
    """The adapter's ExportSpec at the recipe's opset."""
    return dataclasses.replace(recipe.adapter.export_spec(recipe.model), opset=recipe.opset, exporter=recipe.exporter)
