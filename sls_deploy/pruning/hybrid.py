"""Hybrid pruning: channels first, then 2:4 on the narrower layers the target still accelerates.

Channel pruning buys speed on every backend; 2:4 buys speed only where the target runs it on sparse kernels
(on TensorRT: FP16/INT8 3x3 convs with >= 256 channels in and out, ``pruning.target``). The hybrid plan keeps
the channel budget as high as it can: it finds the largest channel budget b_c in [budget, 1] such that the
channel widths selected at b_c, plus 2:4 on every layer of the narrower model the target makes cheaper, cost
at most ``budget`` on the target. Where the target accelerates no layer (EDSR-baseline's 64-channel convs on
TensorRT, any dense backend) this is b_c = budget and no 2:4 at all: the plan says so rather than pruning for
nothing. Architecture knowledge comes in through the callables (the adapter's layers and shapes).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from sls_deploy.pruning.channels.groups import widths_of
from sls_deploy.pruning.channels.selection import select_global
from sls_deploy.pruning.nm.patterns import eligible
from sls_deploy.pruning.nm.plan import LayerPlan
from sls_deploy.pruning.target import layer_cost, trt_accelerates

HYBRID_M, HYBRID_N = 4, 2  # TensorRT's 2:4


def nm_layers_for(target: str, shapes: Mapping[str, Sequence[int]], layer_macs: Mapping[str, int],
                  precision_of: Mapping[str, str]) -> list[LayerPlan]:
    """2:4 on every prunable layer (``shapes``: {layer: weight shape} of the narrower model) that 2:4 makes
    cheaper on ``target``."""
    out = []
    for name, shape in shapes.items():
        prec = precision_of.get(name, "fp16/int8")
        if not eligible(tuple(shape), HYBRID_M, 1):
            continue
        cheaper = (trt_accelerates(shape, prec, HYBRID_N, HYBRID_M) if target == "trt" else target == "none")
        if cheaper:
            out.append(LayerPlan(name=name, op="conv" if len(shape) == 4 else "linear", weight_shape=list(shape),
                                 n=HYBRID_N, m=HYBRID_M, macs_dense=int(layer_macs[name]), precision=prec))
    return out


def nm_saving(target: str, layers: Sequence[LayerPlan]) -> float:
    """MACs the N:M layers save on ``target``."""
    return sum(l.macs_dense - layer_cost(target, l.macs_dense, l.n, l.m, l.weight_shape, l.precision)
               for l in layers)


def channel_budget(budget: float, cost_at: Callable[[float], float], iters: int = 30) -> float:
    """The largest b_c in [budget, 1] with ``cost_at(b_c) <= budget`` (bisection; ``cost_at(budget) <= budget``
    always holds, channels alone meeting the budget)."""
    if cost_at(1.0) <= budget * (1 + 1e-9):
        return 1.0
    lo, hi = budget, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cost_at(mid) <= budget * (1 + 1e-9):
            lo = mid
        else:
            hi = mid
    return lo


class HybridPart:
    """The 2:4 part of a hybrid plan during its channel search: which layers of the narrower model the target
    accelerates, and the channel budget that leaves the whole plan within the budget."""

    def __init__(self, ctx, model, costs, normalize: bool = True):
        self.ctx, self.costs, self.normalize, self.select = ctx, costs, normalize, select_global
        islands = ctx.fp32_islands(model)
        self.precision_of = {d.name: ctx.layer_precision(d.name, islands) for d in ctx.recipe.adapter.layers(model)}

    def shapes(self, widths) -> dict[str, tuple[int, ...]]:
        """{prunable layer: weight shape} of the model at ``widths`` (built on the meta device: no memory)."""
        with torch.device("meta"):
            m = self.ctx.build_model(widths)
        mods = dict(m.named_modules())
        return {d.name: tuple(mods[d.name].weight.shape) for d in self.ctx.recipe.adapter.layers(m) if d.prunable}

    def nm_layers(self, widths):
        return nm_layers_for(self.ctx.settings.target, self.shapes(widths), self.costs.per_layer(widths),
                             self.precision_of)

    def cost(self, widths) -> float:
        return (self.costs.total(widths) - nm_saving(self.ctx.settings.target, self.nm_layers(widths))) \
            / self.costs.dense

    def channel_budget(self, importance) -> float:
        s = self.ctx.settings
        self.select(importance, self.costs, s.budget, s.round_to, self.normalize)  # unreachable: fails here

        def cost_at(b: float) -> float:
            return self.cost(widths_of(self.select(importance, self.costs, b, s.round_to, self.normalize)))

        return channel_budget(s.budget, cost_at)

    def describe(self, plan, budget: float) -> dict[str, Any]:
        s = self.ctx.settings
        n = len(plan.nm_layers)
        return {"channel_budget": round(budget, 6), "layers_2to4": n, "target": s.target,
                "note": (f"{n} layers of the narrower model at 2:4 (the target accelerates them)" if n else
                         f"no 2:4: the target ({s.target}) is predicted to accelerate no layer of the narrower "
                         "model, so the hybrid plan is channels only")}
