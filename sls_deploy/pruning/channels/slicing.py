"""Physical slicing: a dense model's tensors into a narrower model with the same parameter names
(``slice_into``), ``zero_units`` (the dense equivalent of removing units), and ``nm_eligible`` (the layers of a
sliced model that can take N:M masks on top)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.nm.patterns import eligible
from sls_deploy.pruning.channels.groups import (aligned_units, channel_indices, check_groups, conv_of, index_of,
                                                producers_of, unit_count, unit_size)


def _key(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


@torch.no_grad()
def zero_units(model: nn.Module, group, units) -> None:
    """Zero the producer's (every producer's, for a stream group) weight rows and bias of ``units`` in place.

    When every op between producer and consumers maps 0 to 0 (ReLU, LeakyReLU, PixelShuffle, ...), the model
    then computes what the model with those units sliced away computes.
    """
    n = unit_count(model, group)
    idx = aligned_units(group, units, n, f"zero_units '{group.name}'")
    if not producers_of(group):  # a gather group: its consumers stop reading those channels
        for name in group.consumers:
            cons = conv_of(model, name, group, "consumer")
            cons.weight[:, idx.to(cons.weight.device)] = 0
        return
    for name in producers_of(group):
        prod = conv_of(model, name, group, "producer")
        ch = channel_indices(idx, unit_size(group)).to(prod.weight.device)
        prod.weight[ch] = 0
        if prod.bias is not None:
            prod.bias[ch] = 0


@torch.no_grad()
def slice_into(src: nn.Module, dst: nn.Module, groups: Sequence, keep: Mapping[str, torch.Tensor]) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst`` (same names), keeping only the kept units.

    Each group's producer weight/bias rows (every producer's, for a stream group: the same rows) are sliced to
    the kept units' channels (unit k -> channels k*unit .. k*unit+unit-1), each consumer's weight columns
    (dim 1) to the kept units; a layer that reads and writes a stream is sliced on both axes. ``keep[name]``:
    indices, or {producer: indices} that must agree (``aligned_units``). Groups absent from
    ``keep`` are copied whole. Every other tensor must already match ``dst``'s shape.
    """
    units = check_groups(src, groups)
    for name in keep:
        if name not in units:
            raise PlanError(f"kept units given for '{name}', which is not a channel group")
    plan: dict[str, list[tuple[int, torch.Tensor]]] = {}
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    indices: dict[str, torch.Tensor] = {}  # index buffers of groups that are subsets of a full-width tensor
    for g in groups:
        if index_of(g) and (index_of(g) in sd_dst or index_of(g) in sd_src):
            held = sd_src.get(index_of(g), torch.arange(units[g.name]))
            idx = aligned_units(g, keep[g.name], units[g.name], f"kept units of '{g.name}'") \
                if g.name in keep else torch.arange(units[g.name])
            indices[index_of(g)] = held.index_select(0, idx.to(held.device))  # channels of the full tensor
        if g.name not in keep:
            continue
        idx = aligned_units(g, keep[g.name], units[g.name], f"kept units of '{g.name}'")
        if idx.numel() == 0:
            raise PlanError(f"group '{g.name}' keeps no unit")
        ch = channel_indices(idx, unit_size(g))
        for p in producers_of(g):
            plan.setdefault(_key(p, "weight"), []).append((0, ch))
            if conv_of(src, p, g, "producer").bias is not None:
                plan.setdefault(_key(p, "bias"), []).append((0, ch))
        for c in g.consumers:
            plan.setdefault(_key(c, "weight"), []).append((1, idx))
    for k in sd_src:
        if k not in sd_dst and k not in indices:
            raise PlanError(f"tensor '{k}' of the source model is missing from the target model")
    for k in sd_dst:
        if k not in sd_src and k not in indices:
            raise PlanError(f"tensor '{k}' of the target model is missing from the source model")
    for k in plan:
        if k not in sd_src:
            raise PlanError(f"tensor '{k}' to slice is not in the model's state dict (parametrized layer?)")
    out = {}
    for k, v in indices.items():
        if k in sd_dst:
            if tuple(v.shape) != tuple(sd_dst[k].shape):
                raise PlanError(f"index '{k}': {v.numel()} kept channels, the target model has {sd_dst[k].numel()}")
            out[k] = v.to(sd_dst[k].dtype)
        elif not torch.equal(v, torch.arange(v.numel(), device=v.device)) or k in sd_src:
            raise PlanError(f"index '{k}' keeps channels {v.tolist()[:4]}..., but the target model reads the whole "
                            "tensor")
    for k, v in sd_src.items():
        if k in indices:
            continue
        for dim, idx in plan.get(k, []):
            v = v.index_select(dim, idx.to(v.device))
        if tuple(v.shape) != tuple(sd_dst[k].shape):
            raise PlanError(f"tensor '{k}': the sliced source has shape {tuple(v.shape)}, the target model "
                            f"{tuple(sd_dst[k].shape)}")
        out[k] = v
    dst.load_state_dict(out, strict=True)


def nm_eligible(model: nn.Module, m: int, names: Sequence[str] | None = None) -> list[str]:
    """Conv/linear layers of a (sliced) model that can take N:M masks with this M (``nm.eligible``)."""
    wanted = set(names) if names is not None else None
    found = []
    for name, mod in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and eligible(tuple(mod.weight.shape), m,
                                                                 getattr(mod, "groups", 1)):
            found.append(name)
    return found
