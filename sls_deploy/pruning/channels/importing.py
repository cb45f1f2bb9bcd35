"""Kept channels of a model pruned by another tool, mapped onto an adapter's channel groups.

A channel-pruned model (Torch-Pruning, ModelOpt FastNAS, any narrower copy of the dense network) holds narrower
weights and no record of which dense channels it kept. They are found again by matching: every output channel
(weight row and bias) of a group's producer is looked up among the dense producer's channels, restricted to the
input channels already found. So the pruned model must be a slice of the dense weights it was pruned from
(imported before the tool's own finetuning): then every row matches exactly, and the kept units of every group
follow. A tool may reorder channels (ModelOpt sorts them by importance); the mapping puts them back in
ascending dense order, which changes nothing the model computes.

Every producer of a group is matched, not only the first: the producers of a residual stream add their outputs
channel by channel, so they must keep the same dense channels in the same order. A model where they disagree
is not a slice of the dense network and is refused.

Knows nothing of any architecture or tool: the groups come from the adapter, the weights as state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.errors import CheckpointError, PlanError

MATCH_RTOL = 1e-3  # a kept channel's weights equal the dense ones up to this relative L2 distance


@dataclass
class MappedChannels:
    """``keep``: {group: kept unit indices, ascending}; ``state``: the pruned weights with every group's
    channels in that ascending order (what the adapter's narrower model loads); ``shared``: the dense weights
    with the pruned ones written in at the kept channels (slicing it at ``keep`` gives ``state`` exactly);
    ``reordered``: the groups whose channels the tool had kept in another order; ``worst``: the largest
    relative distance of a matched channel."""

    keep: dict[str, list[int]]
    state: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    reordered: list[str]
    worst: float

    @property
    def widths(self) -> dict[str, int]:
        return {g: len(k) for g, k in self.keep.items()}


def _producers(group) -> tuple[str, ...]:
    return tuple(p for p in (getattr(group, "producers", None) or (group.producer,)) if p)


def _rows(state: Mapping[str, torch.Tensor], layer: str, in_ch: torch.Tensor | None) -> torch.Tensor:
    """The layer's output channels as rows: the weight (input channels ``in_ch``) flattened, then the bias."""
    w = state[f"{layer}.weight"].detach().float()
    if in_ch is not None:
        w = w[:, in_ch]
    rows = w.reshape(w.shape[0], -1)
    b = state.get(f"{layer}.bias")
    return torch.cat([rows, b.detach().float().view(-1, 1)], 1) if b is not None else rows


def _match(dense: Mapping[str, torch.Tensor], pruned: Mapping[str, torch.Tensor], layer: str,
           in_ch: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(dense output channel of each pruned output channel, worst relative distance); one-line CheckpointError
    when the pruned layer is not a slice of the dense one."""
    for key in (f"{layer}.weight", f"{layer}.bias"):
        if (key in dense) != (key in pruned):
            raise CheckpointError(f"the pruned model's '{key}' is {'missing' if key in dense else 'unexpected'}")
    d_rows, p_rows = _rows(dense, layer, in_ch), _rows(pruned, layer, None)
    if p_rows.shape[1] != d_rows.shape[1] or p_rows.shape[0] > d_rows.shape[0]:
        raise CheckpointError(f"the pruned model's '{layer}.weight' has shape {tuple(pruned[layer + '.weight'].shape)}, "
                              f"which does not fit the dense layer {tuple(dense[layer + '.weight'].shape)} at the "
                              "channels kept upstream")
    dist = torch.cdist(p_rows.double(), d_rows.double())
    best = dist.argmin(1)
    scale = p_rows.double().norm(dim=1).clamp_min(1e-12)
    rel = dist.gather(1, best.view(-1, 1)).view(-1) / scale
    worst = float(rel.max()) if rel.numel() else 0.0
    if worst <= MATCH_RTOL and len(set(best.tolist())) != best.numel():
        raise CheckpointError(f"layer '{layer}': two of the pruned model's channels equal the same dense channel "
                              "(repeated filters in the dense weights?): the kept channels cannot be told apart")
    if worst > MATCH_RTOL:
        raise CheckpointError(f"layer '{layer}': the pruned model's channels are not channels of the dense weights "
                              f"(relative distance {worst:.2g}); give --weights the dense checkpoint it was pruned "
                              "from, and import it before any finetuning by the other tool")
    return best, worst


def _units(group, channels: torch.Tensor) -> torch.Tensor:
    """Unit indices of ``channels`` (in the pruned model's order) for a group of ``unit`` channels per unit."""
    unit = int(getattr(group, "unit", 1))
    if channels.numel() % unit:
        raise CheckpointError(f"group '{group.name}': {channels.numel()} kept channels are not whole units of {unit}")
    blocks = channels.view(-1, unit)
    units = blocks[:, 0] // unit
    if not torch.equal(blocks, units.view(-1, 1) * unit + torch.arange(unit)):
        raise CheckpointError(f"group '{group.name}': the kept channels are not whole units of {unit} consecutive "
                              "channels (a conv feeding PixelShuffle keeps or drops r*r channels together)")
    return units


def _channels(units: torch.Tensor, unit: int) -> torch.Tensor:
    return (units.view(-1, 1) * unit + torch.arange(unit)).reshape(-1)


def _convs(model: nn.Module, groups: Sequence) -> dict[str, nn.Conv2d]:
    mods = dict(model.named_modules())
    out = {}
    for g in groups:
        if getattr(g, "index", ""):
            raise PlanError(f"channel group '{g.name}' is a subset of a wider tensor (index '{g.index}'): "
                            "import-pruned maps plain conv channel groups only")
        for name in (*_producers(g), *g.consumers):
            m = mods.get(name)
            if not isinstance(m, nn.Conv2d) or m.groups != 1:
                raise PlanError(f"channel group '{g.name}': layer '{name}' is not a plain Conv2d")
            out[name] = m
    return out


def map_kept_channels(model: nn.Module, groups: Sequence, pruned: Mapping[str, torch.Tensor]) -> MappedChannels:
    """Match ``pruned`` (a narrower model's state dict) against ``model`` (the dense model, with the adapter's
    ``groups``): the kept units of every group, the pruned weights in ascending channel order and the dense
    weights with them written in. One-line CheckpointError for a model that is no slice of the dense one,
    PlanError for producers of one group (a residual stream) that keep different channels."""
    _convs(model, groups)
    dense = {k: v.detach() for k, v in model.state_dict().items()}
    extra = sorted(set(pruned) - set(dense))
    if extra:
        raise CheckpointError(f"the pruned model has a tensor '{extra[0]}' that the recipe's model lacks "
                              "(another architecture, or a deeper model?)")
    missing = sorted(set(dense) - set(pruned))
    if missing:
        raise CheckpointError(f"the pruned model lacks '{missing[0]}' (another architecture, or a shallower model?)")
    in_of = {c: g for g in groups for c in g.consumers}
    found: dict[str, torch.Tensor] = {}  # group -> its kept dense units, in the pruned model's order
    unit = {g.name: int(getattr(g, "unit", 1)) for g in groups}

    def inputs(layer: str) -> torch.Tensor | None:  # unit k of a group is input channel k of its consumers
        return found[in_of[layer].name] if layer in in_of else None

    worst = 0.0
    pending = list(groups)
    while pending:
        progress = False
        for g in list(pending):
            first = next((p for p in _producers(g) if p not in in_of or in_of[p].name in found), None)
            if first is None:
                continue
            ch, w = _match(dense, pruned, first, inputs(first))
            found[g.name] = _units(g, ch)
            worst = max(worst, w)
            pending.remove(g)
            progress = True
        if not progress:
            raise PlanError(f"channel groups {', '.join(g.name for g in pending)}: no producer reads known channels")
    for g in groups:  # every other producer must keep the same channels (a residual stream's are summed)
        for p in _producers(g)[1:]:
            ch, w = _match(dense, pruned, p, inputs(p))
            if not torch.equal(ch, _channels(found[g.name], unit[g.name])):
                raise PlanError(f"the residual producers of group '{g.name}' disagree: '{p}' keeps other channels "
                                f"than '{_producers(g)[0]}' (they are summed, so they must keep the same dense "
                                "channels in the same order); prune the stream as one group or leave it whole")
            worst = max(worst, w)
    return _reorder(dense, pruned, groups, found, worst)


def _reorder(dense, pruned, groups, found: dict[str, torch.Tensor], worst: float) -> MappedChannels:
    """The pruned weights in ascending dense channel order, and the dense weights with them written in; every
    layer (grouped or not) checked to be the dense layer at the kept channels."""
    unit = {g.name: int(getattr(g, "unit", 1)) for g in groups}
    order = {g: torch.argsort(u) for g, u in found.items()}  # positions of the pruned units, ascending
    keep = {g: u[order[g]] for g, u in found.items()}
    out_of = {p: g.name for g in groups for p in _producers(g)}
    in_of = {c: g.name for g in groups for c in g.consumers}
    state = {k: v.detach().clone() for k, v in pruned.items()}
    shared = {k: v.clone() for k, v in dense.items()}
    for key, value in pruned.items():
        layer, _, kind = key.rpartition(".")
        out_g, in_g = out_of.get(layer), in_of.get(layer)
        if out_g is None and in_g is None:
            if value.shape != dense[key].shape:
                raise CheckpointError(f"the pruned model's '{key}' has shape {tuple(value.shape)}, the recipe's model "
                                      f"{tuple(dense[key].shape)} (no channel group of the adapter changes it)")
            shared[key] = value.detach().to(dense[key].dtype).clone()
            continue
        v = value.detach()
        if out_g is not None:
            v = v[_channels(order[out_g], unit[out_g])]
        if in_g is not None and kind == "weight":
            v = v[:, order[in_g]]
        rows = _channels(keep[out_g], unit[out_g]) if out_g is not None else torch.arange(dense[key].shape[0])
        target = shared[key]
        if in_g is not None and kind == "weight":
            cols = keep[in_g]
            if v.shape != (len(rows), len(cols), *target.shape[2:]):
                raise CheckpointError(f"the pruned model's '{key}' has shape {tuple(value.shape)}, which does not fit "
                                      "the channels kept by the layers before it")
            sub = target[rows][:, cols]
            _close(key, v, sub)
            target[rows.view(-1, 1), cols.view(1, -1)] = v.to(target.dtype)
        else:
            if v.shape[0] != len(rows) or v.shape[1:] != target.shape[1:]:
                raise CheckpointError(f"the pruned model's '{key}' has shape {tuple(value.shape)}, which does not fit "
                                      "the channels kept by the layers before it")
            _close(key, v, target[rows])
            target[rows] = v.to(target.dtype)
        state[key] = v.contiguous()
    reordered = sorted(g for g, o in order.items() if not torch.equal(o, torch.arange(o.numel())))
    return MappedChannels({g: [int(i) for i in k.tolist()] for g, k in keep.items()}, state, shared, reordered,
                            worst)


def _close(key: str, pruned: torch.Tensor, dense: torch.Tensor) -> None:
    """One-line CheckpointError unless ``pruned`` is ``dense`` (the dense tensor at the kept channels)."""
    d = (pruned.double() - dense.double()).norm()
    if float(d) > MATCH_RTOL * max(float(dense.double().norm()), 1e-12):
        raise CheckpointError(f"the pruned model's '{key}' is not the dense tensor at the kept channels "
                              "(finetuned after pruning, or pruned from other weights?)")
