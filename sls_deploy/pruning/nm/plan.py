"""The sparsity plan: the central artifact between search and everything downstream.

One entry per prunable layer (name, op, weight shape, group axis, N, M, kept channels, precision, MACs dense
and pruned at the recipe's reference resolution), plus the dense layers' MACs so the whole-model totals and
the budget test can be recomputed from the file alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sls_deploy.core import atomic
from sls_deploy.core.errors import BundleError
from sls_deploy.core.numbers import as_int
from sls_deploy.core.safe_json import load_json
from sls_deploy.pruning.nm.patterns import VALID_M, guarantees_2to4
from sls_deploy.pruning.target import CostedLayer, trt_accelerates

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    name: str
    op: str
    weight_shape: list[int]
    n: int
    m: int
    macs_dense: int
    group_axis: int = 1  # input channels
    kept_out: int | None = None  # structured pruning (None = all channels kept)
    kept_in: int | None = None
    precision: str = "fp32"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def macs_pruned(self) -> int:
        return int(round(self.macs_dense * self.n / self.m))

    @property
    def sparse_2to4(self) -> bool:
        """Pruned weights are guaranteed to follow TensorRT's 2:4 pattern."""
        return self.n < self.m and guarantees_2to4(self.n, self.m)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(macs_pruned=self.macs_pruned, density=self.density, sparse_2to4=self.sparse_2to4)
        return d


@dataclass
class DenseLayer:
    name: str
    macs: int
    reason: str


class PlanFile:
    """What every plan shares: whole-model MAC totals from its layers and dense layers, and its JSON file.

    A subclass has ``layers`` (each with ``macs_dense`` and ``macs_pruned``), ``dense_layers`` (DenseLayer),
    ``to_json`` and ``from_json``.
    """

    what = "plan"  # for error messages

    @property
    def macs_dense(self) -> int:
        return sum(l.macs_dense for l in self.layers) + sum(d.macs for d in self.dense_layers)

    @property
    def macs_pruned(self) -> int:
        return sum(l.macs_pruned for l in self.layers) + sum(d.macs for d in self.dense_layers)

    @property
    def ratio(self) -> float:
        return self.macs_pruned / self.macs_dense

    def save(self, path: str | os.PathLike) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.parse(read_plan_json(path), path)

    @classmethod
    def parse(cls, raw: Any, path: str | os.PathLike):
        """The plan in ``raw`` (a plan file's JSON value, from ``read_plan_json``); one-line BundleError."""
        try:
            return cls.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{path} is not a valid {cls.what} ({type(e).__name__}: {e})") from None


def read_plan_json(path: str | os.PathLike) -> Any:
    """A plan file's JSON value, read within bounds (``safe_json``); one-line BundleError when missing or not
    JSON."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"plan not found: {path}")
    return load_json(path, "plan")


@dataclass
class Plan(PlanFile):
    model: str  # recipe name
    method: str
    budget: float
    m: int
    reference_output: list[int]  # [W, H]
    layers: list[LayerPlan]
    dense_layers: list[DenseLayer] = field(default_factory=list)
    budget_scope: str = "whole_model"  # the budget is a fraction of the whole dense model's MACs
    seed: int = 0
    target: str = "trt"  # what the plan is for: "trt" (2:4 kernels) or "none"
    fp32_islands: list[str] = field(default_factory=list)  # layers the FP16/INT8 graphs keep at FP32
    search: dict[str, Any] = field(default_factory=dict)  # what the search did (steps, coeff, ...)

    @property
    def target_ratio(self) -> float:
        """Whole-model cost on the plan's target (pruning/target.py) as a fraction of the dense MACs: what the
        budget bounds."""
        costed = [CostedLayer(l.name, l.macs_dense, l.n, l.m, tuple(l.weight_shape), l.precision) for l in self.layers]
        return (sum(c.cost(self.target) for c in costed) + sum(d.macs for d in self.dense_layers)) / self.macs_dense

    @property
    def trt_2to4_ratio(self) -> float:
        """MACs ratio if only 2:4-compatible layers are accelerated, each by exactly 2x (how TensorRT runs them)."""
        kept = sum(l.macs_dense / 2 if l.sparse_2to4 else l.macs_dense for l in self.layers)
        return (kept + sum(d.macs for d in self.dense_layers)) / self.macs_dense

    def layer(self, name: str) -> LayerPlan:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "model": self.model, "method": self.method, "budget": self.budget,
            "budget_scope": self.budget_scope, "m": self.m, "seed": self.seed,
            "reference_output": self.reference_output,
            "target": self.target,
            "fp32_islands": self.fp32_islands,
            "macs": {"dense": self.macs_dense, "pruned": self.macs_pruned, "ratio": self.ratio,
                     "target_ratio": self.target_ratio, "trt_2to4_ratio": self.trt_2to4_ratio},
            "layers": [l.to_json() | ({"trt_kernel": "sparse 2:4" if l.sparse_2to4 else "dense",
                                       "trt_predicted": "sparse 2:4" if trt_accelerates(
                                           l.weight_shape, l.precision, l.n, l.m) else "dense"}
                                      if self.target == "trt" else {}) for l in self.layers],
            "dense_layers": [asdict(d) for d in self.dense_layers],
            "search": self.search,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        lp_fields = {"name", "op", "weight_shape", "n", "m", "macs_dense", "group_axis", "kept_out", "kept_in",
                     "precision"}
        m = as_int(d["m"], "plan.json 'm'", error=BundleError)
        if m not in VALID_M:
            raise BundleError(f"plan.json: M must be one of {', '.join(map(str, VALID_M))}, not {m}")
        for l in d["layers"]:  # N in 1..M, one M for the whole plan
            as_int(l["n"], f"plan.json layer '{l.get('name')}' N", 1, m, error=BundleError)
            if as_int(l.get("m", m), f"plan.json layer '{l.get('name')}' M", error=BundleError) != m:
                raise BundleError(f"plan.json layer '{l.get('name')}' has M={l.get('m')}, the plan M={m}")
        return cls(model=d["model"], method=d["method"], budget=float(d["budget"]), m=m,
                   reference_output=list(d["reference_output"]),
                   layers=[LayerPlan(**{k: v for k, v in l.items() if k in lp_fields}) for l in d["layers"]],
                   dense_layers=[DenseLayer(**x) for x in d.get("dense_layers", [])],
                   budget_scope=d.get("budget_scope", "whole_model"), seed=int(d.get("seed", 0)),
                   target=d.get("target", "trt"), search=dict(d.get("search", {})),
                   fp32_islands=list(d.get("fp32_islands", [])))
