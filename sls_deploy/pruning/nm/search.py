"""The search stage: measure layers, split prunable from dense, and plan N:M per layer.

- ``oneshot``: uniform N (magnitude masks), the SLS paper's one-shot baseline;
- ``srste``: the same uniform plan, finetuned with SR-STE (see sparsity/srste.py);
- ``sls``: the SLS search (sparsity/sls.py), which trains while it searches and hands its weights on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sls_deploy.core.errors import BudgetError, PlanError
from sls_deploy.config.recipe import Recipe
from sls_deploy.pruning.nm import eligible
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.pruning.nm.oneshot import Candidate, check_budget, plan_oneshot
from sls_deploy.pruning.nm.plan import DenseLayer, LayerPlan, Plan
from sls_deploy.pruning.nm.sls import SLSSearch, SLSSettings
from sls_deploy.pruning.target import can_save, layer_outlook, n_cost_fractions


@dataclass
class LayerSplit:
    candidates: list[Candidate]
    dense: list[DenseLayer]
    target: str = "none"

    @property
    def total(self) -> int:
        return sum(c.macs for c in self.candidates) + sum(d.macs for d in self.dense)

    def smallest_ratio(self, m: int) -> float:
        """The cheapest cost on the target: every candidate at its cheapest N."""
        cheapest = sum(c.macs * min(c.fraction(n, m) for n in range(1, m + 1)) for c in self.candidates)
        return (sum(d.macs for d in self.dense) + cheapest) / self.total


def split_layers(recipe: Recipe, model: torch.nn.Module, m: int, target: str = "none",
                 precision_of: Mapping[str, str] | None = None) -> LayerSplit:
    """Every weight layer's MACs at the reference resolution; candidates vs dense (with the reason).

    A candidate is prunable (the adapter), eligible for M-wide groups, and cheaper with some N < M on ``target``
    (``precision_of`` = {layer: "fp32" | "fp16/int8"}, the deployed precision: an FP32 layer gets no 2:4 kernel).
    A model with no candidate is a one-line error saying why and what can prune it instead.
    """
    h, w = recipe.reference_input_hw()
    macs = layer_macs(model, recipe.adapter.example_input(recipe.model, h, w))
    modules = dict(model.named_modules())
    candidates, dense, no_gain = [], [], []
    for decl in recipe.adapter.layers(model):
        mod = modules[decl.name]
        shape = tuple(mod.weight.shape)
        cost = macs.get(decl.name, 0)
        precision = (precision_of or {}).get(decl.name, "fp16/int8")
        if not decl.prunable:
            dense.append(DenseLayer(decl.name, cost, decl.reason or "declared dense by the adapter"))
        elif not eligible(shape, m, getattr(mod, "groups", 1)):
            dense.append(DenseLayer(decl.name, cost, f"input channels {shape[1]} not a multiple of M={m}"))
        elif not can_save(target, m, shape, precision):
            why = _no_gain(target, m, shape, precision)
            dense.append(DenseLayer(decl.name, cost, why))
            no_gain.append((decl.name, why))
        else:
            candidates.append(Candidate(decl.name, decl.op, shape, cost,
                                        n_cost_fractions(target, m, shape, precision)))
    if not candidates:
        if no_gain:
            name, why = no_gain[0]
            raise BudgetError(
                f"N:M pruning saves nothing on --target {target}: no layer of {recipe.describe_model()} gets "
                f"cheaper ('{name}': {why}); use a channel method (--method ssl) or --target none to count N:M "
                "at N/M of the MACs (the SLS paper's metric)")
        raise PlanError(f"model has no layer eligible for {m}-wide N:M groups (input channels must divide by {m})")
    return LayerSplit(candidates, dense, target)


def _no_gain(target: str, m: int, shape, precision: str) -> str:
    if target == "ort":
        return "--target ort: a dense backend runs N:M weights at full cost"
    if m != 4:
        return f"--target trt: TensorRT accelerates 2:4 only, not N:{m}"
    outlook, why = layer_outlook(shape, precision, True)
    return f"--target trt: TensorRT is not expected to pick a 2:4 kernel ({why.split(':')[0]})"


def check_reachable(split: LayerSplit, budget: float, m: int) -> None:
    floor = split.smallest_ratio(m)
    if budget < floor - 1e-12:
        raise BudgetError(
            f"budget {budget:g} cannot be met with M={m} on --target {split.target}: the smallest reachable budget "
            f"is {floor:.4f} (the cheapest N on every candidate layer; "
            f"{sum(d.macs for d in split.dense) / split.total:.1%} of the MACs are in layers that stay dense); "
            "a channel method (--method ssl) prunes further")


def plan_uniform(recipe: Recipe, split: LayerSplit, budget: float, m: int, method: str,
                 n: int | None = None) -> Plan:
    """Uniform N: the largest that fits the budget, or ``n`` if given (which must fit it too)."""
    check_reachable(split, budget, m)
    plan = plan_oneshot(recipe.name, split.candidates, split.dense, budget, m, list(recipe.reference_output))
    plan.target = split.target
    if n is not None:
        if n > plan.layers[0].n:
            need = (sum(d.macs for d in split.dense) + sum(c.macs * c.fraction(n, m) for c in split.candidates)) \
                / split.total
            raise PlanError(f"N={n} of M={m} keeps {need:.3f} of the MACs, above the budget {budget:g} "
                            f"(the largest N that fits is {plan.layers[0].n})")
        for layer in plan.layers:
            layer.n = n
    plan.method = method
    return plan


def search_sls(recipe: Recipe, model: torch.nn.Module, split: LayerSplit, budget: float, settings: SLSSettings,
               sampler, max_steps: int, lr: float, *, train: Callable[..., Any], seed: int) -> tuple[Plan, dict]:
    """Run the SLS search on ``model`` in place (its weights are trained too); return the plan and a summary.
    ``train(model, sampler, *, controller, desc, **config)`` is the caller's training loop (the search stage's:
    checkpoint, resume key, device settings)."""
    check_budget(budget)
    check_reachable(split, budget, settings.m)
    h, w = recipe.reference_input_hw()
    controller = SLSSearch([(c.name, c.macs) for c in split.candidates], sum(d.macs for d in split.dense), budget,
                           settings, patch_scale=(settings.cost_patch / recipe.scale) ** 2 / (h * w),
                           fractions={c.name: c.fractions for c in split.candidates if c.fractions is not None})
    result = train(model, sampler, steps=max_steps, lr=lr, min_lr_ratio=1.0, checkpoint_every=10,
                   controller=_FinalizeSearch(controller), desc="search")
    forced = controller.closed_by_force
    raised = controller.settled
    n = controller.n_per_layer()
    layers = [LayerPlan(name=c.name, op=c.op, weight_shape=list(c.weight_shape), n=n[c.name], m=settings.m,
                        macs_dense=c.macs) for c in split.candidates]
    plan = Plan(model=recipe.name, method="sls", budget=budget, m=settings.m,
                reference_output=list(recipe.reference_output), layers=layers, dense_layers=list(split.dense),
                seed=seed, target=split.target)
    info = {"steps": result.steps_done, "reached_budget_at": controller.frozen_at, "gates_closed_by_force": forced,
            "layers_raised_to_equal_cost_n": raised,
            "coeff": controller.coeff, "history": controller.history[-20:],
            "settings": settings.__dict__}
    plan.search = info
    return plan, info


class _FinalizeSearch:
    """Wraps the SLS controller so that a search that ran out of steps still ends within the budget."""

    def __init__(self, inner: SLSSearch):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def detach(self, model: torch.nn.Module) -> None:
        if not self.inner.finished:
            self.inner.closed_by_force = self.inner.force_budget()
            self.inner.refresh()
        self.inner.settled = self.inner.settle()
        self.inner.detach(model)
