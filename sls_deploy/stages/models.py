"""Build-time checks on the models a stage works on (FP32 islands, a plan's channel indices).

Loading a model (the recipe's architecture with base or bundle weights, at a plan's widths) lives in the runtime
layer, ``backends/loading.py``, which inference uses too.
"""

from __future__ import annotations

import torch

from sls_deploy.config.recipe import Recipe
from sls_deploy.core.errors import PlanError, RecipeError


def fp32_islands(recipe: Recipe, model: torch.nn.Module) -> list[str]:
    """The recipe's FP32 islands (or the adapter's default); each must name a weight layer of the model."""
    islands = list(recipe.precision.fp32_islands if recipe.precision.fp32_islands is not None
                   else recipe.adapter.default_fp32_islands(model))
    layers = {d.name for d in recipe.adapter.layers(model)}
    for name in islands:
        if name not in layers:
            raise RecipeError(f"precision.fp32_islands: '{name}' matches no layer of {recipe.describe_model()}")
    return islands


def check_plan_indices(model: torch.nn.Module, plan) -> None:
    """A channel plan's subset groups (RSC reads/writes) must name the channels the weights' index buffers hold:
    a plan and weights that disagree would run the wrong channels silently (one-line PlanError)."""
    buffers = dict(model.named_buffers())
    for g in getattr(plan, "groups", []):
        if not getattr(g, "index", "") or g.kept_units == g.dense_units:
            continue
        held = buffers.get(g.index)
        if held is None:
            raise PlanError(f"plan group '{g.name}' keeps {g.kept_units} of {g.dense_units} channels but the model "
                            f"has no index '{g.index}'")
        if held.tolist() != list(g.kept):
            raise PlanError(f"plan group '{g.name}' keeps channels {list(g.kept)[:4]}... but the weights' "
                            f"'{g.index}' holds {held.tolist()[:4]}...: the plan's read/write indices and the weights "
                            "disagree")
