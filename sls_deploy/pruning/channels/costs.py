"""Whole-model MACs as a function of the channel groups' widths (exact against ``layer_macs``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.channels.groups import check_groups, check_roles, producers_of
from sls_deploy.pruning.macs import layer_macs


class GroupCosts:
    """Whole-model MACs as a function of the groups' widths.

    ``macs``: dense MACs per layer (``layer_macs``); ``units``: units per group. A producer's MACs scale with
    (kept units / units) of its group, a consumer's with (kept units / units) of the group it reads, a layer
    that is both with the product (the square for a layer that reads and writes one stream group); other
    layers are unchanged. Integer arithmetic: the totals equal
    ``layer_macs`` of the sliced model exactly.
    """

    def __init__(self, macs: Mapping[str, int], groups: Sequence, units: Mapping[str, int]):
        check_roles(groups)
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
