"""Channel groups and their units: the structure every channel-pruning step reads.

A group (``ChannelGroup`` of the model adapter; read here by duck typing: ``name``, ``producer``,
``consumers``, ``unit`` and optionally ``producers``) ties the output channels of one conv (the producer) to the
input channels of the convs that read them (the consumers). Unit k is the producer's output channels
[k*unit, (k+1)*unit) (weight rows and bias) and input channel k of every consumer; unit = r*r when the producer
feeds PixelShuffle(r) (unit k becomes post-shuffle channel k), else 1. Pruning a group keeps some of its units;
``widths`` = {group name: kept units}.

A stream group has several producers (``producers``): convs whose outputs are summed into one residual stream,
so unit k of every producer is the same stream channel k. Every producer (weight rows) and every consumer (input
columns) keeps the same unit indices; a layer may both read and write the stream. Kept units may be given per
producer ({producer: indices}) to state the alignment explicitly: indices that differ between producers are
refused (PlanError). It knows nothing of any particular architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.errors import PlanError


def unit_size(group) -> int:
    return int(getattr(group, "unit", 1))


def producers_of(group) -> tuple[str, ...]:
    """The group's producers: ``producers`` if it has some, else ``(producer,)``; none for a gather group (its
    consumers read the kept channels of a full-width tensor, see ``index_of``)."""
    return tuple(p for p in (getattr(group, "producers", None) or (group.producer,)) if p)


def index_of(group) -> str:
    """The model buffer naming the group's channels inside a full-width tensor ('' for an ordinary group)."""
    return str(getattr(group, "index", "") or "")


def conv_of(model: nn.Module, name: str, group, role: str) -> nn.Conv2d:
    mod = dict(model.named_modules()).get(name)
    if mod is None:
        raise PlanError(f"channel group '{group.name}': {role} '{name}' is not a module of the model")
    if not isinstance(mod, nn.Conv2d):
        raise PlanError(f"channel group '{group.name}': {role} '{name}' is a {type(mod).__name__}, not a Conv2d")
    return mod


def unit_count(model: nn.Module, group) -> int:
    """Number of units of ``group``: the producer's output channels // unit, which every consumer must read
    (and every other producer of a stream group must give)."""
    unit = unit_size(group)
    if unit < 1:
        raise PlanError(f"channel group '{group.name}': unit must be >= 1, not {unit}")
    prods = producers_of(group)
    if not prods:  # a gather group: its consumers read units channels of a full-width tensor
        if unit != 1 or not group.consumers:
            raise PlanError(f"channel group '{group.name}': a group without producer needs consumers and unit 1")
        widths = {c: conv_of(model, c, group, "consumer").in_channels for c in group.consumers}
        if len(set(widths.values())) > 1:
            raise PlanError(f"channel group '{group.name}': its consumers read different widths {widths}")
        return next(iter(widths.values()))
    first = conv_of(model, prods[0], group, "producer")
    if first.out_channels % unit:
        raise PlanError(f"channel group '{group.name}': producer '{prods[0]}' has {first.out_channels} output "
                        f"channels, not a multiple of the unit {unit}")
    units = first.out_channels // unit
    for name in prods[1:]:
        other = conv_of(model, name, group, "producer")
        if other.out_channels != first.out_channels:
            raise PlanError(f"channel group '{group.name}': producer '{name}' has {other.out_channels} output "
                            f"channels but producer '{prods[0]}' has {first.out_channels}")
    for name in group.consumers:
        cons = conv_of(model, name, group, "consumer")
        if cons.in_channels != units:
            raise PlanError(f"channel group '{group.name}': consumer '{name}' reads {cons.in_channels} channels but "
                            f"producer '{prods[0]}' gives {units} units of {unit} channel(s)")
    return units


def check_roles(groups: Sequence) -> None:
    """Group names unique; a layer produces for at most one group and consumes from at most one; only a stream
    group (several producers) may have a layer that reads and writes it."""
    names, producers, consumers = set(), {}, {}
    for g in groups:
        if g.name in names:
            raise PlanError(f"channel group '{g.name}' is declared twice")
        names.add(g.name)
        prods = producers_of(g)
        if len(set(prods)) != len(prods):
            raise PlanError(f"channel group '{g.name}' lists a producer twice")
        for p in prods:
            if p in producers:
                raise PlanError(f"layer '{p}' is the producer of two channel groups ('{producers[p]}', '{g.name}')")
            producers[p] = g.name
        for c in g.consumers:
            if c in prods and len(prods) == 1:
                raise PlanError(f"channel group '{g.name}': layer '{c}' cannot consume its own output")
            if c in consumers:
                raise PlanError(f"layer '{c}' is a consumer of two channel groups ('{consumers[c]}', '{g.name}')")
            consumers[c] = g.name


def check_groups(model: nn.Module, groups: Sequence) -> dict[str, int]:
    """Validate ``groups`` against ``model`` for slicing and costing; return {group name: units}.

    Beyond ``unit_count``: names are unique, a layer produces for / consumes from at most one group, and no
    producer or consumer is a grouped (depthwise) conv, whose channels cannot be removed on one side only.
    """
    check_roles(groups)
    units = {}
    for g in groups:
        units[g.name] = unit_count(model, g)
        for role, name in [("producer", p) for p in producers_of(g)] + [("consumer", c) for c in g.consumers]:
            mod = conv_of(model, name, g, role)
            if mod.groups != 1:
                raise PlanError(f"channel group '{g.name}': {role} '{name}' is a grouped/depthwise conv "
                                f"(groups={mod.groups}); channel pruning through it is not supported")
    return units


def channel_indices(units: torch.Tensor, unit: int) -> torch.Tensor:
    """Unit indices -> channel indices: unit k -> k*unit, ..., k*unit + unit - 1, in order."""
    return (units.view(-1, 1) * unit + torch.arange(unit, device=units.device)).reshape(-1)


def _as_units(idx, n_units: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(idx).reshape(-1).long().cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_units):
        raise PlanError(f"{what}: unit indices must lie in 0..{n_units - 1}")
    u = torch.unique(t)  # sorted ascending
    if u.numel() != t.numel():
        raise PlanError(f"{what}: unit indices repeat")
    return u


def _count(name: str, v) -> int:
    if isinstance(v, Mapping):  # {producer: indices} of a stream group: all must keep as many units
        counts = {p: int(torch.as_tensor(i).numel()) for p, i in v.items()}
        if len(set(counts.values())) > 1:
            raise PlanError(f"channel group '{name}': its producers keep different widths {counts} "
                            f"(a stream's producers must keep the same units)")
        return next(iter(counts.values())) if counts else 0
    return int(torch.as_tensor(v).numel())


def widths_of(keep: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{group name: number of kept units} (a {producer: indices} value must have one width)."""
    return {k: _count(k, v) for k, v in keep.items()}


def aligned_units(group, idx, n_units: int, what: str) -> torch.Tensor:
    """The kept unit indices of ``group`` (ascending) from ``idx``: indices, or {producer: indices} naming every
    producer of the group with the same indices. Producers that disagree (in width or indices) are refused."""
    if not isinstance(idx, Mapping):
        return _as_units(idx, n_units, what)
    prods = producers_of(group)
    missing, extra = [p for p in prods if p not in idx], [p for p in idx if p not in prods]
    if extra:
        raise PlanError(f"{what}: '{extra[0]}' is not a producer of channel group '{group.name}'")
    if missing:
        raise PlanError(f"{what}: no kept units given for producer '{missing[0]}' (every producer of a stream "
                        f"keeps the same units)")
    per = {p: _as_units(idx[p], n_units, f"{what} ({p})") for p in prods}
    first = prods[0]
    for p in prods[1:]:
        if not torch.equal(per[p], per[first]):
            kind = "widths" if per[p].numel() != per[first].numel() else "indices"
            raise PlanError(f"{what}: producers '{first}' and '{p}' of stream group '{group.name}' keep different "
                            f"unit {kind} ({per[first].numel()} vs {per[p].numel()} units); a stream's producers "
                            f"must keep the same units")
    return per[first]
