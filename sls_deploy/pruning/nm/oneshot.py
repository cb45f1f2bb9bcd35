"""One-shot magnitude N:M planning (the SLS paper's "one-shot" baseline).

Uniform N over every candidate layer; N is the largest value for which the whole model's cost at the
reference resolution fits ``budget * dense MACs``. A candidate's cost of N is ``macs * fractions[N - 1]``: N/M by
default (MACs, the paper's metric), or what the target does with N:M (``sls_deploy.pruning.target``). The masks
then follow from the weights (top-N |w| per group).
"""

from __future__ import annotations

from dataclasses import dataclass

from sls_deploy.core.errors import BudgetError, PlanError
from sls_deploy.pruning.nm.plan import DenseLayer, LayerPlan, Plan


@dataclass(frozen=True)
class Candidate:
    """A layer the planner may prune, as the caller measured it."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    macs: int
    fractions: tuple[float, ...] | None = None  # cost of N = 1..M as a fraction of ``macs``; None: N/M

    def fraction(self, n: int, m: int) -> float:
        return self.fractions[n - 1] if self.fractions is not None else n / m


def check_budget(budget: float) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise PlanError(f"budget must be a number in (0, 1], not '{budget}'") from None
    if not 0.0 < b <= 1.0:
        raise PlanError(f"budget must be in (0, 1] (fraction of the dense model's MACs), not {b:g}")
    return b


def plan_oneshot(model_name: str, candidates: list[Candidate], dense: list[DenseLayer], budget: float, m: int,
                 reference_output: list[int]) -> Plan:
    budget = check_budget(budget)
    if not candidates:
        raise PlanError(f"no layer can take {m}-wide N:M groups (input channels must divide by {m})")
    fixed = sum(d.macs for d in dense)
    total = sum(c.macs for c in candidates) + fixed

    def cost(n: int) -> float:
        return fixed + sum(c.macs * c.fraction(n, m) for c in candidates)

    best = None
    for n in range(m, 0, -1):
        if cost(n) <= budget * total + 1e-9 * total:
            best = n
            break
    if best is None:
        smallest = min(cost(n) for n in range(1, m + 1)) / total
        raise BudgetError(
            f"budget {budget:g} cannot be met with M={m}: the smallest reachable budget is {smallest:.4f} "
            f"(the cheapest N on every candidate layer; {fixed / total:.1%} of the MACs are in layers that stay "
            "dense)")
    layers = [LayerPlan(name=c.name, op=c.op, weight_shape=list(c.weight_shape), n=best, m=m, macs_dense=c.macs)
              for c in candidates]
    return Plan(model=model_name, method="oneshot", budget=budget, m=m, reference_output=list(reference_output),
                layers=layers, dense_layers=list(dense))
