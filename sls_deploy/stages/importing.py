"""`import-sls`: a bundle whose plan and starting weights come from masks searched elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sls_deploy.config.recipe import Recipe
from sls_deploy.config.settings import Settings
from sls_deploy.core import atomic
from sls_deploy.core.bundle import MASKS, PLAN, Bundle, digest
from sls_deploy.core.checkpoints import read_state_dict, save_weights
from sls_deploy.core.errors import UsageError
from sls_deploy.pruning.nm import Plan
from sls_deploy.pruning.nm.importing import (import_masks, is_modelopt, masks_from_modelopt,
                                             masks_from_sls_checkpoint, read_mask_file)
from sls_deploy.backends.loading import resolve_base_weights
from sls_deploy.stages.search import SEARCH_WEIGHTS

IMPORTED_DENSE = "imported.dense.safetensors"  # the imported checkpoint's weights before masking


def run_import(recipe: Recipe, source: Path, out: Path, weights: str | None, m: int | None) -> Plan:
    sd = read_state_dict(source)
    if is_modelopt(sd):  # NVIDIA ModelOpt: weights and *._weight_mask in one state dict (mto.save or plain)
        dense_sd, masks, group_m = masks_from_modelopt(sd)
        if m and m != group_m:
            raise UsageError(f"--m {m} differs from ModelOpt's 2:4 masks (M={group_m})")
    elif source.suffix == ".safetensors" and not any(k.endswith(".priority_scores") for k in sd):
        base = resolve_base_weights(recipe, weights)
        masks, group_m = read_mask_file(source), m or recipe.sparsity_m
        dense_sd = recipe.adapter.convert_state_dict(read_state_dict(base), recipe.model)
    else:
        dense_sd, masks, group_m = masks_from_sls_checkpoint(sd)
        if m and m != group_m:
            raise UsageError(f"--m {m} differs from the checkpoint's pruning units (M={group_m})")
    plan, model, dense, ours = import_masks(recipe, dense_sd, masks, group_m)
    settings = Settings.resolve(recipe, budget=plan.budget, method="imported", m=group_m, weights=weights)
    plan.target = settings.target
    bundle = Bundle(out)
    bundle.lock()
    bundle.claim(settings.build_key(recipe), Path(recipe.path).read_text(), settings.to_record())
    save_weights(dense, bundle.path(IMPORTED_DENSE), {"source": str(source)})
    save_weights(model, bundle.path(SEARCH_WEIGHTS), {"plan": "imported"})
    with atomic.atomic_path(bundle.path(MASKS)) as tmp:  # kept exactly as imported (uneven groups, all-zero layers)
        save_file({k: v.to(torch.uint8).contiguous() for k, v in sorted(ours.items())}, str(tmp))
    plan.save(bundle.path(PLAN))
    bundle.record_stage("search", digest({"source": atomic.sha256_file(source)}), [PLAN, SEARCH_WEIGHTS,
                        IMPORTED_DENSE, MASKS], 0.0, {"base_weights": str(bundle.path(IMPORTED_DENSE)),
                                               "init_weights": str(bundle.path(SEARCH_WEIGHTS)),
                                               "source": str(source)})
    return plan
