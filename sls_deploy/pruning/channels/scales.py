"""Learned per-unit channel scales (SSL/ASSL): a training controller whose scales rank the units."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.errors import PlanError, UsageError
from sls_deploy.pruning.channels.groups import aligned_units, check_groups, producers_of, unit_size


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
        return (s[i] if s.dim() == 2 else s).repeat_interleave(unit_size(g))

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
