"""Modalities: how data meets the model, chosen by the recipe (``modality``), never by a model-kind switch.

- ``image``: N,C,H,W images; training on random aligned LR/HR patches, L1 loss.
- ``clip``: N,T,C,H,W windows of frames per graph run (BasicVSR); training on clips, optional frame-difference
  term in the loss.
- ``step``: one step of a recurrent model (StreamVSR): trained and evaluated on clips like ``clip``; its graph is
  one step whose state inputs are fed back from its outputs (ExportSpec.recurrent).

``lookup(name)`` gives the modality object (``base.Modality``); the functions below are the stages' entry
points, each one lookup and one call. The names themselves (``MODALITIES``) are defined in ``config.recipe``,
which checks a recipe's value and does not import this package.
"""

from __future__ import annotations

from typing import Callable

import torch

from sls_deploy.config.recipe import MODALITIES, Recipe
from sls_deploy.core.errors import RecipeError, short_repr
from sls_deploy.modalities.base import Modality
from sls_deploy.modalities.clip import ClipModality
from sls_deploy.modalities.image import ImageModality
from sls_deploy.modalities.step import StepModality

__all__ = ["MODALITIES", "REGISTRY", "lookup", "resolve_data", "sampler", "loss_fn",
           "frames_per_run"]

REGISTRY: dict[str, Modality] = {m.name: m for m in (ImageModality(), ClipModality(), StepModality())}


def lookup(name: str) -> Modality:
    """The modality object of ``name``; an unknown name is a one-line RecipeError."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise RecipeError(f"unknown modality {short_repr(name)} (known: {', '.join(REGISTRY)})") from None



def resolve_data(modality: str, spec: str) -> list:
    """The files (images) or clip sources (video) a data spec names; a missing folder is a one-line error."""
    return lookup(modality).resolve_data(spec)


def sampler(recipe: Recipe, modality: str, spec: str, seed: int):
    """Training batches of the recipe's finetune section: LR/HR patches or clips, read lazily by
    ``recipe.data_workers`` loader processes (``spec`` may also be a prepare-data memmap cache of images)."""
    return lookup(modality).sampler(recipe, spec, seed)


def loss_fn(modality: str, temporal_weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """None (plain L1) for images; for clips L1 plus ``temporal_weight`` x L1 of frame-to-frame differences."""
    return lookup(modality).loss(temporal_weight)


def frames_per_run(example) -> int:
    """Frames per graph run: T of a clip input (N, T, C, H, W), else 1 (a step or image graph)."""
    first = example[0] if isinstance(example, tuple) else example
    return int(first.shape[1]) if first.dim() == 5 else 1
