"""Modalities: how data meets the model, chosen by the recipe (``modality``), never by a model-kind switch.

- ``image``: N,C,H,W images; training on random aligned LR/HR patches, L1 loss.
- ``clip``: N,T,C,H,W windows of frames per graph run (BasicVSR); training on clips, optional frame-difference
  term in the loss.
- ``step``: one step of a recurrent model (StreamVSR): trained and evaluated on clips like ``clip``; its graph is
  one step whose state inputs are fed back from its outputs (ExportSpec.recurrent).
"""

from __future__ import annotations

from typing import Callable

import torch

from sls_deploy.config.recipe import MODALITIES, Recipe
from sls_deploy.data import PatchSampler, resolve_images
from sls_deploy.data.catalog import training_images
from sls_deploy.data.video import ClipSampler, resolve_clips
from sls_deploy.training.losses import temporal_l1

__all__ = ["MODALITIES", "modality_of", "is_video", "resolve_data", "sampler", "loss_fn", "frames_per_run"]


def modality_of(recipe: Recipe) -> str:
    return recipe.modality


def is_video(modality: str) -> bool:
    """Clips of frames (clip and step modalities) rather than single images."""
    return modality in ("clip", "step")


def resolve_data(modality: str, spec: str) -> list:
    """The files (images) or clip sources (video) a data spec names; a missing folder is a one-line error."""
    return resolve_clips(spec) if is_video(modality) else resolve_images(spec)


def sampler(recipe: Recipe, modality: str, spec: str, seed: int):
    """Training batches of the recipe's finetune section: LR/HR patches or clips, read lazily by
    ``recipe.data_workers`` loader processes (``spec`` may also be a prepare-data memmap cache of images)."""
    sec = recipe.finetune
    if is_video(modality):
        return ClipSampler(resolve_clips(spec), recipe.scale, sec.lr_patch, recipe.model.options["clip_len"],
                           sec.batch_size, seed=seed, workers=recipe.data_workers)
    return PatchSampler(training_images(spec), recipe.scale, sec.lr_patch, sec.batch_size, seed=seed,
                        degradation=recipe.adapter.degradation(recipe.model), workers=recipe.data_workers)


def loss_fn(modality: str, temporal_weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """None (plain L1) for images; for clips L1 plus ``temporal_weight`` x L1 of frame-to-frame differences."""
    return temporal_l1(temporal_weight) if is_video(modality) else None


def frames_per_run(example) -> int:
    """Frames per graph run: T of a clip input (N, T, C, H, W), else 1 (a step or image graph)."""
    first = example[0] if isinstance(example, tuple) else example
    return int(first.shape[1]) if first.dim() == 5 else 1
