"""Binary unit masks switched at run time: one full-width network computing any of several narrower ones.

``UnitMasks`` hooks every group's producers (a gather group: its consumers' inputs) and multiplies the removed
units' channels by 0, for the kept-unit sets of the member that is active (``use``). As ``zero_units`` shows,
a network with a unit's producer rows zeroed computes what the network with the unit sliced away computes, so the
masked full-width network *is* each narrower member, and one weight set trained under all the masks serves every
member (nested channel families, ClassPruning's shared weights). Generic: any model, any groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.device import model_device
from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.channels.groups import aligned_units, check_groups, producers_of

__all__ = ["UnitMasks", "is_nested"]


def _unit(group) -> int:
    return int(getattr(group, "unit", 1))


class UnitMasks:
    """``members``: {member name: {group: kept unit indices}} (groups absent from a member stay whole).
    ``attach(model)`` registers the hooks; ``use(name)`` selects the member they compute (None: the whole
    network); ``detach()`` removes them."""

    def __init__(self, model: nn.Module, groups: Sequence, members: Mapping[str, Mapping[str, torch.Tensor]]):
        self.groups = list(groups)
        self.units = check_groups(model, self.groups)
        by_name = {g.name: g for g in self.groups}
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        for member, keep in members.items():
            per = {}
            for name, idx in keep.items():
                if name not in by_name:
                    raise PlanError(f"member '{member}': '{name}' is not a channel group")
                kept = aligned_units(by_name[name], idx, self.units[name], f"member '{member}', group '{name}'")
                m = torch.zeros(self.units[name])
                m[kept] = 1.0
                per[name] = m.repeat_interleave(_unit(by_name[name]))
            self.masks[member] = per
        self.active: str | None = None
        self._handles: list = []

    def use(self, member: str | None) -> None:
        if member is not None and member not in self.masks:
            raise PlanError(f"unknown member '{member}' (known: {', '.join(self.masks)})")
        self.active = member

    def _mask(self, group: str, like: torch.Tensor) -> torch.Tensor | None:
        if self.active is None:
            return None
        m = self.masks[self.active].get(group)
        return None if m is None else m.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)

    def attach(self, model: nn.Module) -> None:
        if self._handles:
            raise PlanError("unit masks are already attached")
        device = model_device(model)  # the masks move once, not at every forward pass
        self.masks = {member: {g: m.to(device) for g, m in per.items()} for member, per in self.masks.items()}
        modules = dict(model.named_modules())
        for g in self.groups:
            if not producers_of(g):  # a gather group: the consumers stop reading the removed channels
                for name in g.consumers:
                    def pre(mod, args, g=g):
                        m = self._mask(g.name, args[0])
                        return None if m is None else (args[0] * m,) + tuple(args[1:])

                    self._handles.append(modules[name].register_forward_pre_hook(pre))
                continue
            for name in producers_of(g):
                def hook(mod, inp, out, g=g):
                    m = self._mask(g.name, out)
                    return None if m is None else out * m

                self._handles.append(modules[name].register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def is_nested(smaller: Mapping[str, torch.Tensor], larger: Mapping[str, torch.Tensor]) -> bool:
    """Whether every group's kept units in ``smaller`` are a subset of ``larger``'s (a group absent from
    ``larger`` is whole there)."""
    for name, idx in smaller.items():
        if name in larger and not set(torch.as_tensor(idx).tolist()) <= set(torch.as_tensor(larger[name]).tolist()):
            return False
    return True
