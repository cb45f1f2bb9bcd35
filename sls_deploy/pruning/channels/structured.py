"""Structured (channel) pruning for any network, driven by the channel groups an adapter declares.

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
refused (PlanError).

This module gives, for any ``nn.Module`` and list of groups:

- unit importances: ``l1_importance`` (filter magnitude) and learned per-unit scales (``ChannelScales``, a
  training controller with SSL's growing L2 penalty on the units marked unimportant, folded into the weights
  at the end);
- MACs as a function of the widths (``GroupCosts``), exact against ``layer_macs`` of the sliced model;
- width selection under a whole-model MAC budget (``select_global``: one threshold on normalised importances
  across groups; ``select_uniform``: the same kept fraction in every group, the L1-norm baseline);
- physical slicing of a dense model's tensors into a narrower model with the same parameter names
  (``slice_into``), and ``zero_units`` (the dense equivalent of removing units).

It knows nothing of any particular architecture; the narrower model is built by the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction

import torch
from torch import nn

from sls_deploy.core.errors import BudgetError, PlanError, UsageError
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.pruning.nm.patterns import eligible
from sls_deploy.pruning.nm.oneshot import check_budget

__all__ = ["ChannelScales", "GroupCosts", "aligned_units", "check_groups", "index_of", "l1_importance",
           "nm_eligible", "producers_of", "select_global", "select_uniform", "slice_into", "top_units", "unit_count",
           "widths_of", "zero_units"]


# --------------------------------------------------------------------------- groups and units


def _unit(group) -> int:
    return int(getattr(group, "unit", 1))


def producers_of(group) -> tuple[str, ...]:
    """The group's producers: ``producers`` if it has some, else ``(producer,)``; none for a gather group (its
    consumers read the kept channels of a full-width tensor, see ``index_of``)."""
    return tuple(p for p in (getattr(group, "producers", None) or (group.producer,)) if p)


def index_of(group) -> str:
    """The model buffer naming the group's channels inside a full-width tensor ('' for an ordinary group)."""
    return str(getattr(group, "index", "") or "")


def _conv(model: nn.Module, name: str, group, role: str) -> nn.Conv2d:
    mod = dict(model.named_modules()).get(name)
    if mod is None:
        raise PlanError(f"channel group '{group.name}': {role} '{name}' is not a module of the model")
    if not isinstance(mod, nn.Conv2d):
        raise PlanError(f"channel group '{group.name}': {role} '{name}' is a {type(mod).__name__}, not a Conv2d")
    return mod


def unit_count(model: nn.Module, group) -> int:
    """Number of units of ``group``: the producer's output channels // unit, which every consumer must read
    (and every other producer of a stream group must give)."""
    unit = _unit(group)
    if unit < 1:
        raise PlanError(f"channel group '{group.name}': unit must be >= 1, not {unit}")
    prods = producers_of(group)
    if not prods:  # a gather group: its consumers read units channels of a full-width tensor
        if unit != 1 or not group.consumers:
            raise PlanError(f"channel group '{group.name}': a group without producer needs consumers and unit 1")
        widths = {c: _conv(model, c, group, "consumer").in_channels for c in group.consumers}
        if len(set(widths.values())) > 1:
            raise PlanError(f"channel group '{group.name}': its consumers read different widths {widths}")
        return next(iter(widths.values()))
    first = _conv(model, prods[0], group, "producer")
    if first.out_channels % unit:
        raise PlanError(f"channel group '{group.name}': producer '{prods[0]}' has {first.out_channels} output "
                        f"channels, not a multiple of the unit {unit}")
    units = first.out_channels // unit
    for name in prods[1:]:
        other = _conv(model, name, group, "producer")
        if other.out_channels != first.out_channels:
            raise PlanError(f"channel group '{group.name}': producer '{name}' has {other.out_channels} output "
                            f"channels but producer '{prods[0]}' has {first.out_channels}")
    for name in group.consumers:
        cons = _conv(model, name, group, "consumer")
        if cons.in_channels != units:
            raise PlanError(f"channel group '{group.name}': consumer '{name}' reads {cons.in_channels} channels but "
                            f"producer '{prods[0]}' gives {units} units of {unit} channel(s)")
    return units


def _check_roles(groups: Sequence) -> None:
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
    _check_roles(groups)
    units = {}
    for g in groups:
        units[g.name] = unit_count(model, g)
        for role, name in [("producer", p) for p in producers_of(g)] + [("consumer", c) for c in g.consumers]:
            mod = _conv(model, name, g, role)
            if mod.groups != 1:
                raise PlanError(f"channel group '{g.name}': {role} '{name}' is a grouped/depthwise conv "
                                f"(groups={mod.groups}); channel pruning through it is not supported")
    return units


def _channels(units: torch.Tensor, unit: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------- importance


def l1_importance(model: nn.Module, group, normalize: bool = True) -> torch.Tensor:
    """Per-unit L1 norm of the producer's filters (float32, shape [units]).

    A unit's value is the sum of |w| over its ``unit`` weight rows (bias excluded). With ``normalize`` (the
    default) it is divided by the number of weights summed, unit * fan-in (in_channels/groups * kh * kw):
    the mean |w| of the unit, so units of layers with different fan-in or unit size compare on one scale.
    A stream group's unit gets the mean of that value over its producers (normalised), or the sum (not).
    """
    units = unit_count(model, group)
    total = None
    prods = producers_of(group)
    if not prods:  # a gather group: the consumers' weight columns (mean |w| per input channel)
        for name in group.consumers:
            w = _conv(model, name, group, "consumer").weight.detach().float()
            per_unit = w.abs().transpose(0, 1).reshape(units, -1).sum(1)
            if normalize:
                per_unit = per_unit / (w.shape[0] * w[0, 0].numel())
            total = per_unit if total is None else total + per_unit
        return total / len(group.consumers) if normalize else total
    for name in prods:
        w = _conv(model, name, group, "producer").weight.detach().float()
        per_unit = w.abs().reshape(units, -1).sum(1)  # rows are contiguous: unit k = rows k*unit .. k*unit+unit-1
        if normalize:
            per_unit = per_unit / (_unit(group) * w[0].numel())
        total = per_unit if total is None else total + per_unit
    return total / len(prods) if normalize else total


# --------------------------------------------------------------------------- learned scales (SSL)


class ChannelScales:
    """Learnable per-unit scales on each group's producer output, with SSL's growing L2 penalty.

    A forward hook multiplies output channel c of the producer by ``scale[c // unit]`` (scales start at 1, so
    attaching changes nothing). ``mark(keep)`` names the units to keep; every other unit of a marked group is
    unimportant. ``penalty()`` = sum over groups of reg_g * ||scales of g's unimportant units||^2. reg_g starts
    at ``reg`` and, every ``grow_every`` steps, grows by ``delta`` (capped at ``cap``) in each group that has
    unimportant units at that step: the penalty grows until the marked units are driven to ~0, while the kept
    ones train freely. ``fold()`` multiplies the scales into the producers' weight rows and biases, removes the
    hooks and resets the scales to 1, so the model alone computes what the hooked model computed.

    A stream group (several producers) has one scale per unit per producer (``scales[name]`` of shape
    [producers, units]; [units] for a one-producer group), as in ASSL where every conv writing the stream has
    its own weight-norm scale: the producers stay free to weigh a stream channel differently, folding stays
    exact per producer, and there is something to align. The unit's importance is the mean |scale| over the
    producers; marks and the L2 penalty act on the same units of every producer. ``align`` > 0 adds ASSL's SSA
    term: per producer a soft keep-mask S_p = sigmoid(scale_p - thr_p), thr_p its n_marked-th smallest scale
    (detached), and align * -(mean over producer pairs p < q of mean_k S_p[k] S_q[k]), which rewards the
    producers' masks for overlapping (only in groups with marks).

    Training controller (``sls_deploy.training.loop.Controller``): ``attach`` registers the hooks, ``param_groups`` adds
    the scales to the optimiser (at ``lr`` if given, else on the weights' schedule), ``regularizer`` is the
    penalty, ``after_step`` grows the coefficients (a repeated step number is ignored), ``detach`` folds.
    """

    def __init__(self, model: nn.Module, groups: Sequence, *, reg: float = 0.0, delta: float = 1e-4,
                 grow_every: int = 10, cap: float = 1.0, lr: float | None = None, align: float = 0.0):
        for name, v in (("reg", reg), ("delta", delta), ("cap", cap), ("align", align)):
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise UsageError(f"channel scales: {name} must be a non-negative number, not {v!r}")
        if reg > cap:
            raise UsageError(f"channel scales: initial reg {reg:g} exceeds its cap {cap:g}")
        if not isinstance(grow_every, int) or grow_every < 1:
            raise UsageError(f"channel scales: grow_every must be an integer >= 1, not {grow_every!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise UsageError(f"channel scales: lr must be a positive number, not {lr!r}")
        self.groups = list(groups)
        units = check_groups(model, self.groups)
        modules = dict(model.named_modules())
        self.units = units
        self.delta, self.grow_every, self.cap, self.lr = float(delta), grow_every, float(cap), lr
        self.align = float(align)
        self.scales: dict[str, nn.Parameter] = {}
        for g in self.groups:
            prods = producers_of(g)
            w = modules[prods[0] if prods else g.consumers[0]].weight
            shape = (units[g.name],) if len(prods) <= 1 else (len(prods), units[g.name])
            self.scales[g.name] = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))
        self.reg = {g.name: float(reg) for g in self.groups}
        self.unimportant = {g.name: torch.zeros(units[g.name], dtype=torch.bool) for g in self.groups}
        self.last_step = 0
        self.folded_importance: dict[str, torch.Tensor] | None = None  # |scale| at the last fold
        self._handles: list = []
        self._producers: dict[str, list[nn.Conv2d]] = {}
        self._consumers: dict[str, list[nn.Conv2d]] = {}  # gather groups: the convs whose inputs are scaled

    # -- the scales ------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.scales.values())

    def importance(self) -> dict[str, torch.Tensor]:
        """{group: |scale| per unit (mean over a stream's producers)} (meaningful before ``fold``, which resets
        the scales to 1)."""
        out = {}
        for k, s in self.scales.items():
            a = s.detach().abs().float().cpu()
            out[k] = a.mean(0) if a.dim() == 2 else a
        return out

    def _expanded(self, g, i: int = 0) -> torch.Tensor:
        s = self.scales[g.name]
        return (s[i] if s.dim() == 2 else s).repeat_interleave(_unit(g))

    def mark(self, keep: Mapping[str, torch.Tensor]) -> None:
        """For each named group, every unit not in ``keep[name]`` becomes unimportant (others keep their marks)."""
        by_name = {g.name: g for g in self.groups}
        for name, idx in keep.items():
            if name not in self.unimportant:
                raise PlanError(f"mark: '{name}' is not one of the channel groups")
            kept = aligned_units(by_name[name], idx, self.units[name], f"mark '{name}'")
            flags = torch.ones(self.units[name], dtype=torch.bool)
            flags[kept] = False
            self.unimportant[name] = flags

    def soft_masks(self, name: str) -> torch.Tensor:
        """SSA's soft keep-masks of a group, [producers, units]: sigmoid(scale - thr), thr (detached) each
        producer's n-th smallest scale, n the group's number of marked units (thr = -inf without marks)."""
        s = self.scales[name]
        s2 = s if s.dim() == 2 else s.unsqueeze(0)
        n = int(self.unimportant[name].sum())
        if n == 0:
            thr = torch.full_like(s2[:, :1], -math.inf)
        else:
            thr = torch.sort(s2.detach(), dim=1).values[:, n - 1:n]
        return torch.sigmoid(s2 - thr)

    def alignment_penalty(self) -> torch.Tensor | None:
        """-(mean over producer pairs of mean_k S_p[k] S_q[k]) summed over the stream groups with marks, times
        ``align``; None when it does not apply."""
        total = None
        for g in self.groups:
            s = self.scales[g.name]
            if s.dim() != 2 or not bool(self.unimportant[g.name].any()):
                continue
            m = self.soft_masks(g.name)
            gram = m @ m.t() / m.shape[1]  # [P, P]: mean overlap of every pair
            iu = torch.triu_indices(m.shape[0], m.shape[0], offset=1, device=m.device)
            term = -self.align * gram[iu[0], iu[1]].mean()
            total = term if total is None else total + term
        return total

    def penalty(self) -> torch.Tensor:
        total = None
        for name, s in self.scales.items():
            flags = self.unimportant[name].to(s.device)
            if not bool(flags.any()):
                continue
            term = self.reg[name] * s[..., flags].pow(2).sum()
            total = term if total is None else total + term
        if self.align > 0:
            ssa = self.alignment_penalty()
            if ssa is not None:
                total = ssa if total is None else total + ssa
        if total is None:
            return next(iter(self.scales.values())).new_zeros(()) if self.scales else torch.zeros(())
        return total

    # -- controller interface ------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if self._handles:
            raise PlanError("channel scales are already attached to a model")
        units = check_groups(model, self.groups)
        if units != self.units:
            raise PlanError(f"channel scales were made for units {self.units}, the model has {units}")
        modules = dict(model.named_modules())
        for g in self.groups:
            mods = []
            if not producers_of(g):  # a gather group: scale the consumers' input channels (SSL's act_scale_pre)
                for name in g.consumers:
                    mod = modules[name]

                    def pre(m, args, g=g):
                        return (args[0] * self._expanded(g).view(-1, 1, 1),) + tuple(args[1:])

                    self._handles.append(mod.register_forward_pre_hook(pre))
                    mods.append(mod)
                self._consumers[g.name] = mods
                continue
            for i, name in enumerate(producers_of(g)):
                mod = modules[name]

                def hook(m, inp, out, g=g, i=i):
                    # channel axis is -3 of (N, C, H, W) and (C, H, W)
                    return out * self._expanded(g, i).view(-1, 1, 1)

                self._handles.append(mod.register_forward_hook(hook))
                mods.append(mod)
            self._producers[g.name] = mods

    def param_groups(self) -> list[dict]:
        group: dict = {"params": list(self.parameters())}
        if self.lr is not None:
            group["fixed_lr"] = self.lr
        return [group]

    def regularizer(self) -> torch.Tensor | None:
        if not any(bool(f.any()) for f in self.unimportant.values()):
            return None
        return self.penalty()

    def after_step(self, model: nn.Module, step: int) -> None:
        if step <= self.last_step:  # the loop may repeat a step's bookkeeping after Ctrl-C
            return
        for s in range(self.last_step + 1, step + 1):
            if s % self.grow_every == 0:
                for name, flags in self.unimportant.items():
                    if bool(flags.any()):
                        self.reg[name] = min(self.cap, self.reg[name] + self.delta)
        self.last_step = step

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the scales into the producers' weight rows and biases; remove the hooks; scales back to 1.

        The scales' values just before folding stay readable as ``folded_importance`` ({group: |scale|})."""
        if self._producers or self._consumers:
            self.folded_importance = self.importance()
        for g in self.groups:
            for mod in self._consumers.get(g.name, []):  # input-side scale: into the weight columns
                mod.weight.mul_(self._expanded(g).to(mod.weight.dtype).view(1, -1, *([1] * (mod.weight.dim() - 2))))
            if g.name in self._consumers:
                self.scales[g.name].fill_(1.0)
                continue
            mods = self._producers.get(g.name)
            if mods is None:
                continue
            for i, mod in enumerate(mods):
                s = self._expanded(g, i).to(mod.weight.dtype)
                mod.weight.mul_(s.view(-1, *([1] * (mod.weight.dim() - 1))))
                if mod.bias is not None:
                    mod.bias.mul_(s.to(mod.bias.dtype))
            self.scales[g.name].fill_(1.0)  # in place: the optimiser holds this parameter
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._producers.clear()
        self._consumers.clear()

    def detach(self, model: nn.Module) -> None:
        self.fold()

    def state_dict(self) -> dict:
        return {"scales": {k: s.detach().clone() for k, s in self.scales.items()}, "reg": dict(self.reg),
                "unimportant": {k: f.clone() for k, f in self.unimportant.items()}, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        with torch.no_grad():
            for k, s in self.scales.items():
                s.copy_(state["scales"][k])
        self.reg = {k: float(v) for k, v in state["reg"].items()}
        self.unimportant = {k: f.clone().bool() for k, f in state["unimportant"].items()}
        self.last_step = int(state["last_step"])


# --------------------------------------------------------------------------- MACs as a function of widths


class GroupCosts:
    """Whole-model MACs as a function of the groups' widths.

    ``macs``: dense MACs per layer (``layer_macs``); ``units``: units per group. A producer's MACs scale with
    (kept units / units) of its group, a consumer's with (kept units / units) of the group it reads, a layer
    that is both with the product (the square for a layer that reads and writes one stream group); other
    layers are unchanged. Integer arithmetic: the totals equal
    ``layer_macs`` of the sliced model exactly.
    """

    def __init__(self, macs: Mapping[str, int], groups: Sequence, units: Mapping[str, int]):
        _check_roles(groups)
        self.macs = {k: int(v) for k, v in macs.items()}
        self.units = {g.name: int(units[g.name]) for g in groups}
        self._out: dict[str, str] = {}
        self._in: dict[str, str] = {}
        for g in groups:
            for layer in (*producers_of(g), *g.consumers):
                if layer not in self.macs:
                    raise PlanError(f"channel group '{g.name}': layer '{layer}' has no MAC count")
            for p in producers_of(g):
                self._out[p] = g.name
            for c in g.consumers:
                self._in[c] = g.name

    @classmethod
    def measure(cls, model: nn.Module, groups: Sequence,
                example: torch.Tensor | tuple[torch.Tensor, ...]) -> GroupCosts:
        """Count ``model``'s layer MACs for ``example``'s shape (``layer_macs``) and check the groups against it."""
        units = check_groups(model, groups)
        return cls(layer_macs(model, example), groups, units)

    @property
    def dense(self) -> int:
        return sum(self.macs.values())

    def _widths(self, widths: Mapping[str, int]) -> dict[str, int]:
        full = dict(self.units)
        for name, w in widths.items():
            if name not in full:
                raise PlanError(f"width given for '{name}', which is not a channel group")
            if int(w) != w or not 1 <= w <= full[name]:
                raise PlanError(f"width of group '{name}' must be an integer in 1..{full[name]}, not {w}")
            full[name] = int(w)
        return full

    def per_layer(self, widths: Mapping[str, int]) -> dict[str, int]:
        w = self._widths(widths)
        out = {}
        for layer, macs in self.macs.items():
            num, den = 1, 1
            if layer in self._out:
                g = self._out[layer]
                num, den = num * w[g], den * self.units[g]
            if layer in self._in:
                g = self._in[layer]
                num, den = num * w[g], den * self.units[g]
            out[layer] = macs * num // den
        return out

    def total(self, widths: Mapping[str, int]) -> int:
        return sum(self.per_layer(widths).values())

    def ratio(self, widths: Mapping[str, int]) -> float:
        return self.total(widths) / self.dense

    def min_widths(self, round_to: int = 8, names: Sequence[str] | None = None) -> dict[str, int]:
        """The narrowest widths selection can reach: min(round_to, units) per group (``names``: those pruned)."""
        names = list(self.units) if names is None else names
        return {n: min(round_to, self.units[n]) for n in names}


# --------------------------------------------------------------------------- width selection


def _rounded(count: int, units: int, round_to: int) -> int:
    """Round a kept count down to a multiple of round_to; full width stays; never below min(round_to, units)."""
    if count >= units:
        return units
    return max(min(round_to, units), count // round_to * round_to)


def _prepare(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float, round_to: int):
    budget = check_budget(budget)
    if not isinstance(round_to, int) or round_to < 1:
        raise PlanError(f"round_to must be an integer >= 1, not {round_to!r}")
    if not importances:
        raise PlanError("no channel group to prune")
    imps = {}
    for name, v in importances.items():
        if name not in costs.units:
            raise PlanError(f"importance given for '{name}', which is not a channel group")
        t = torch.as_tensor(v).detach().float().cpu().reshape(-1)
        if t.numel() != costs.units[name]:
            raise PlanError(f"importance of group '{name}' has {t.numel()} values for {costs.units[name]} units")
        if not bool(torch.isfinite(t).all()):
            raise PlanError(f"importance of group '{name}' is not finite")
        imps[name] = t
    limit = budget * costs.dense * (1 + 1e-9)
    lowest = costs.total(costs.min_widths(round_to, list(imps)))
    if lowest > limit:
        raise BudgetError(
            f"budget {budget:g} cannot be met by channel pruning: the smallest reachable ratio is "
            f"{lowest / costs.dense:.4f} (every pruned group at min({round_to}, units) units)")
    return imps, limit


def _top(imp: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values (ties: lowest index first), sorted ascending."""
    order = torch.argsort(imp, descending=True, stable=True)
    return torch.sort(order[:k]).values.long()


def top_units(importance: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` units of largest importance (ties: lowest index first), ascending: for one fixed ranking, the
    sets for growing k are nested."""
    t = torch.as_tensor(importance).detach().float().cpu().reshape(-1)
    if not 1 <= int(k) <= t.numel():
        raise PlanError(f"cannot keep {k} of {t.numel()} units")
    return _top(t, int(k))


def _last_true(n: int, fits: Callable[[int], bool]) -> int:
    """Largest i in 0..n-1 with fits(i), for fits true on a prefix (fits(0) must hold)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_global(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float,
                  round_to: int = 8, normalize: bool = True) -> dict[str, torch.Tensor]:
    """Kept units per group from one importance threshold shared by all groups, the lowest meeting the budget.

    With ``normalize`` (default) each group's importances are divided by their mean (unless all zero); without
    it the raw values compete (SSL's public code: one global threshold on the raw |scale| of every unit, there by
    a pruned-unit count, here the count the MAC budget allows). Normalised, groups measured on different
    scales compare. At threshold t a group keeps its units with normalised importance >= t, the count rounded
    down to a multiple of ``round_to`` (full width stays, at least min(round_to, units)), the top-k by
    importance. t is bisected over the importance values so that the whole model's MACs are <= budget * dense;
    what rounding left of the budget is then spent widening the groups whose next units matter most (``_fill``).
    Groups not in ``importances`` stay at full width. Returns {group: kept unit indices, ascending}.
    """
    imps, limit = _prepare(importances, costs, budget, round_to)
    normed = {n: (t / t.mean() if normalize and float(t.mean()) > 0 else t) for n, t in imps.items()}
    desc = {n: torch.sort(t, descending=True).values for n, t in normed.items()}
    # thresholds from the lowest (everything kept) up to +inf (every group at its minimum)
    cands = torch.unique(torch.cat(list(normed.values()))).tolist() + [float("inf")]

    def widths(i: int) -> dict[str, int]:
        t = cands[i]
        return {n: _rounded(int((d >= t).sum()), d.numel(), round_to) for n, d in desc.items()}

    # total MACs fall as the threshold rises: find the first threshold that fits (from the top, a prefix fits)
    rev = len(cands) - 1
    j = _last_true(len(cands), lambda k: costs.total(widths(rev - k)) <= limit)
    chosen = _fill(widths(rev - j), desc, costs, limit, round_to)
    return {n: _top(imps[n], chosen[n]) for n in imps}


def _fill(widths: dict[str, int], desc: Mapping[str, torch.Tensor], costs: GroupCosts, limit: float,
          round_to: int) -> dict[str, int]:
    """Spend what rounding left of the budget: repeatedly widen, by one step of ``round_to`` units, the group whose
    next units have the highest mean normalised importance, while the whole model still fits ``limit``."""
    widths = dict(widths)
    while True:
        best, best_score = None, -math.inf
        for n, d in desc.items():
            w = widths[n]
            if w >= d.numel():
                continue
            grown = min(d.numel(), (w // round_to + 1) * round_to)
            score = float(d[w:grown].mean())
            if score > best_score and costs.total({**widths, n: grown}) <= limit:
                best, best_score = (n, grown), score
        if best is None:
            return widths
        widths[best[0]] = best[1]


def select_uniform(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float,
                   round_to: int = 8, fill: bool = False) -> dict[str, torch.Tensor]:
    """The same kept fraction f in every group (L1-norm uniform pruning), the largest f meeting the budget.

    A group keeps floor(f * units) units rounded as in ``select_global``, the top-k by importance. With ``fill``,
    what the common fraction left of the budget is then spent as ``select_global`` does (``_fill``: one rounding
    step at a time, to the group whose next units matter most), so the result lands as close under the budget
    as the rounding allows (comparisons at equal MACs). Groups not in ``importances`` stay at full width.
    Returns {group: kept unit indices, ascending}.
    """
    imps, limit = _prepare(importances, costs, budget, round_to)
    cands = sorted({Fraction(k, t.numel()) for t in imps.values() for k in range(t.numel() + 1)})

    def widths(i: int) -> dict[str, int]:
        f = cands[i]
        return {n: _rounded(int(f * t.numel()), t.numel(), round_to) for n, t in imps.items()}

    i = _last_true(len(cands), lambda k: costs.total(widths(k)) <= limit)
    chosen = widths(i)
    if fill:
        normed = {n: (t / t.mean() if float(t.mean()) > 0 else t) for n, t in imps.items()}
        chosen = _fill(chosen, {n: torch.sort(t, descending=True).values for n, t in normed.items()}, costs, limit,
                       round_to)
    return {n: _top(imps[n], chosen[n]) for n in imps}


# --------------------------------------------------------------------------- physical slicing


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
            cons = _conv(model, name, group, "consumer")
            cons.weight[:, idx.to(cons.weight.device)] = 0
        return
    for name in producers_of(group):
        prod = _conv(model, name, group, "producer")
        ch = _channels(idx, _unit(group)).to(prod.weight.device)
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
        ch = _channels(idx, _unit(g))
        for p in producers_of(g):
            plan.setdefault(_key(p, "weight"), []).append((0, ch))
            if _conv(src, p, g, "producer").bias is not None:
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


# --------------------------------------------------------------------------- hybrid: N:M on top


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
