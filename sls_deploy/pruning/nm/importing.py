"""Masks searched elsewhere enter the pipeline here (`sls-deploy import-sls`).

Three inputs are accepted:
- a checkpoint in the public SLS code's layout: for each searched layer ``<layer>.weight``,
  ``<layer>.priority_scores`` (M-1 values) and ``<layer>.pruning_units`` (M stacked 1:M unit masks, unit i =
  the (i+1)-th largest weight of each group). The mask is unit 0 plus the units whose gate is open
  (gates = cumprod(clamp(scores, 0, 1.03)) > 0.5, as the SLS code freezes them);
- a plain safetensors file ``{layer name: mask}`` (non-zero = kept), with dense weights from ``--weights``;
- an NVIDIA ModelOpt sparsified model (``modelopt.torch.sparsity``, e.g. ``sparse_magnitude``): its state dict
  holds ``<layer>.weight`` and a boolean ``<layer>._weight_mask`` per sparsified module, either as saved by
  ``mto.save`` (``{"modelopt_state": ..., "model_state_dict": ...}``, read weights-only) or as a plain state
  dict. ModelOpt's sparsity is 2:4 (M = 4).
An all-ones mask means the layer stays dense (ModelOpt gives one to every module it does not sparsify, e.g. a
first conv with 3 input channels).
The result is a bundle holding plan.json and the masked weights as the finetune stage's starting point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from sls_deploy.core.checkpoints import load_weights, read_state_dict
from sls_deploy.core.errors import CheckpointError
from sls_deploy.config.recipe import Recipe
from sls_deploy.pruning.nm.search import split_layers
from sls_deploy.pruning.nm.patterns import VALID_M, max_nonzeros_per_group
from sls_deploy.pruning.nm.plan import LayerPlan, Plan

SCORES, UNITS = ".priority_scores", ".pruning_units"
MODELOPT_MASK = "._weight_mask"
MODELOPT_M = 4  # modelopt.torch.sparsity: 2:4


def _strip_wrapper_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SLS trainer saves its ``Model`` wrapper: every key starts with ``model.``."""
    if sd and all(k.startswith("model.") for k in sd):
        return {k[len("model."):]: v for k, v in sd.items()}
    return dict(sd)


def masks_from_sls_checkpoint(sd: Mapping[str, torch.Tensor], clamp: float = 1.03
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Split an SLS checkpoint into (plain weights, {layer: bool mask}, M) in the checkpoint's own names."""
    sd = _strip_wrapper_prefix(sd)
    layers = sorted({k[: -len(SCORES)] for k in sd if k.endswith(SCORES)} |
                    {k[: -len(UNITS)] for k in sd if k.endswith(UNITS)})
    if not layers:
        raise CheckpointError("checkpoint holds no '<layer>.priority_scores' / '<layer>.pruning_units' "
                              "(not an SLS checkpoint; a plain {layer: mask} file must be .safetensors)")
    masks, ms = {}, set()
    for layer in layers:
        scores, units, weight = sd.get(layer + SCORES), sd.get(layer + UNITS), sd.get(layer + ".weight")
        if units is None:
            raise CheckpointError(f"layer '{layer}': checkpoint has priority scores but no pruning units")
        if scores is None:
            raise CheckpointError(f"layer '{layer}': checkpoint has pruning units but no priority scores")
        if weight is None:
            raise CheckpointError(f"layer '{layer}': checkpoint has no weight")
        m = units.shape[0]
        if tuple(units.shape[1:]) != tuple(weight.shape) or scores.numel() != m - 1:
            raise CheckpointError(f"layer '{layer}': pruning units {tuple(units.shape)} and scores "
                                  f"{tuple(scores.shape)} do not fit weight {tuple(weight.shape)} (M={m})")
        gates = torch.cumprod(scores.float().clamp(0, clamp), 0) > 0.5
        keep = units[0].bool() | (units[1:].bool() & gates.view(-1, *([1] * weight.dim()))).any(0)
        masks[layer] = keep
        ms.add(m)
    if len(ms) != 1:
        raise CheckpointError(f"checkpoint mixes group sizes M = {sorted(ms)}; one plan has one M")
    weights = {k: v for k, v in sd.items() if not k.endswith((SCORES, UNITS))}
    return weights, masks, ms.pop()


def is_modelopt(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(MODELOPT_MASK) for k in sd)


def masks_from_modelopt(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Split a ModelOpt sparsified state dict into (plain weights, {layer: bool mask}, M)."""
    masks = {k[: -len(MODELOPT_MASK)]: v.bool() for k, v in sd.items() if k.endswith(MODELOPT_MASK)}
    if not masks:
        raise CheckpointError("checkpoint holds no '<layer>._weight_mask' (not a ModelOpt sparsified model)")
    for layer in masks:
        if layer + ".weight" not in sd:
            raise CheckpointError(f"ModelOpt mask '{layer}{MODELOPT_MASK}' has no '{layer}.weight' beside it")
    weights = {k: v for k, v in sd.items() if not k.endswith(MODELOPT_MASK)}
    return weights, masks, MODELOPT_M


def read_mask_file(path: Path) -> dict[str, torch.Tensor]:
    sd = read_state_dict(path)
    return {k: v != 0 for k, v in sd.items()}


def import_masks(recipe: Recipe, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 group_m: int) -> tuple[Plan, torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """Build the recipe's model from ``weights`` (any supported layout), apply ``masks`` (same layout's names)
    and plan N per layer. Returns (plan, masked model, dense model, {our layer name: bool mask})."""
    adapter = recipe.adapter
    rename = adapter.key_map(list(weights) + [f"{layer}.weight" for layer in masks])
    model = recipe.build_model()
    load_weights(model, adapter.convert_state_dict(weights, recipe.model), recipe.describe_model())
    dense = recipe.build_model()
    dense.load_state_dict(model.state_dict())
    modules = dict(model.named_modules())
    prunable = {d.name for d in adapter.layers(model) if d.prunable}
    ours: dict[str, torch.Tensor] = {}
    for layer, mask in masks.items():
        name = rename.get(f"{layer}.weight", f"{layer}.weight")[: -len(".weight")]
        if name not in modules or not hasattr(modules[name], "weight"):
            raise CheckpointError(f"mask for '{layer}' matches no layer of {recipe.describe_model()}")
        if tuple(mask.shape) != tuple(modules[name].weight.shape):
            raise CheckpointError(f"mask for '{layer}' has shape {tuple(mask.shape)}, layer '{name}' weight "
                                  f"{tuple(modules[name].weight.shape)}")
        if bool(mask.bool().all()):  # all ones: the layer stays dense (ModelOpt's unsparsified modules)
            continue
        if name not in prunable:
            raise CheckpointError(f"mask for '{layer}': layer '{name}' stays dense in recipe '{recipe.name}'")
        ours[name] = mask.bool()
    if group_m not in VALID_M:
        raise CheckpointError(f"M must be one of {VALID_M}, not {group_m}")
    split = split_layers(recipe, model, group_m)
    layers = []
    with torch.no_grad():
        for c in split.candidates:
            n = group_m
            if c.name in ours:
                modules[c.name].weight.mul_(ours[c.name].to(modules[c.name].weight.dtype))
                n = max(1, max_nonzeros_per_group(ours[c.name].to(torch.uint8), group_m))
            layers.append(LayerPlan(name=c.name, op=c.op, weight_shape=list(c.weight_shape), n=n, m=group_m,
                                    macs_dense=c.macs))
    missing = set(ours) - {c.name for c in split.candidates}
    if missing:
        name = sorted(missing)[0]
        raise CheckpointError(f"mask for '{name}': its input channels do not divide by M={group_m}")
    plan = Plan(model=recipe.name, method="imported", budget=1.0, m=group_m,
                reference_output=list(recipe.reference_output), layers=layers, dense_layers=list(split.dense))
    plan.budget = round(plan.ratio, 4)
    plan.search = {"imported_layers": len(ours)}
    return plan, model, dense, ours
