"""The structured (channel) plan: which units of each channel group are kept, and what that costs.

The counterpart of ``plan.Plan`` (N:M) for channel pruning, written as ``plan.json`` with ``"kind":
"structured"``. It holds everything downstream stages need (the kept widths, from which the adapter builds the
narrower model) and everything a reader needs to check the budget from the file alone: every layer's MACs dense
and pruned, and the dense layers with the reason they stay dense. MACs are for one run of the exported graph at
the reference resolution (``frames`` frames: a clip graph runs a whole clip, a step graph one frame).
Knows nothing of any architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.nm.plan import DenseLayer, LayerPlan, Plan, PlanFile
from sls_deploy.pruning.target import layer_cost

STRUCTURED_PLAN_VERSION = 1
STRUCTURED_KIND = "structured"
_LAYER_PLAN_FIELDS = {"name", "op", "weight_shape", "n", "m", "macs_dense", "group_axis", "kept_out", "kept_in",
                      "precision"}  # plan.json's "kind" for a channel plan (N:M plans have none)


@dataclass
class GroupPlan:
    """One channel group's kept units. ``producers``: every conv writing the group's channels (several for a
    residual stream, all keeping ``kept``); defaults to [producer]. ``producer_kept`` ({producer: kept}) is
    optional and only checked: a plan whose producers disagree with ``kept`` (width or indices) is refused."""

    name: str
    producer: str
    consumers: list[str]
    unit: int  # channels per unit (4 for a conv feeding PixelShuffle(2))
    dense_units: int
    kept: list[int]  # kept unit indices, ascending
    producers: list[str] = field(default_factory=list)
    producer_kept: dict[str, list[int]] | None = None
    index: str = ""  # a subset of a full-width tensor (RSC): the model buffer holding the kept channels

    def __post_init__(self) -> None:
        if not self.producers:
            self.producers = [self.producer] if self.producer else []
        self.producers = list(self.producers)
        self.consumers = list(self.consumers)

    @property
    def kept_units(self) -> int:
        return len(self.kept)

    def validate(self) -> None:
        """One-line PlanError on an inconsistent group (producers, kept indices, disagreeing stream producers)."""
        where = f"channel plan, group '{self.name}'"
        if not self.producers and not (self.index and self.consumers):
            raise PlanError(f"{where}: a group without producer must be an index (gather) group with consumers")
        if self.producers and self.producers[0] != self.producer:
            raise PlanError(f"{where}: producer '{self.producer}' is not the first of its producers {self.producers}")
        if len(set(self.producers)) != len(self.producers):
            raise PlanError(f"{where}: a producer is listed twice")
        if not self.kept or sorted(set(self.kept)) != list(self.kept) or \
                not all(0 <= k < self.dense_units for k in self.kept):
            raise PlanError(f"{where}: kept must be distinct ascending unit indices in 0..{self.dense_units - 1}")
        if self.producer_kept is not None:
            for p in self.producers:
                if p not in self.producer_kept:
                    raise PlanError(f"{where}: producer_kept has no entry for producer '{p}'")
            for p, k in self.producer_kept.items():
                if p not in self.producers:
                    raise PlanError(f"{where}: producer_kept names '{p}', which is not one of its producers")
                if list(k) != list(self.kept):
                    kind = "width" if len(k) != len(self.kept) else "indices"
                    raise PlanError(f"{where}: producer '{p}' keeps different unit {kind} than the group "
                                    f"({len(k)} vs {len(self.kept)} units); a stream's producers must keep the "
                                    f"same units")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["producer_kept"] is None:
            del d["producer_kept"]
        d["kept_units"] = self.kept_units
        d["kept_fraction"] = self.kept_units / self.dense_units
        return d


@dataclass
class LayerCost:
    name: str
    macs_dense: int
    macs_pruned: int
    out_group: str | None = None  # the group whose producer it is (its output channels shrink)
    in_group: str | None = None  # the group it consumes (its input channels shrink)


@dataclass
class StructuredPlan(PlanFile):
    what = "structured plan"
    model: str  # recipe name
    method: str  # ssl | l1 | l1-global
    budget: float
    round_to: int
    reference_output: list[int]  # [W, H] of the SR output at which MACs are counted
    frames: int  # frames per graph run at which MACs are counted
    groups: list[GroupPlan]
    layers: list[LayerCost]
    dense_layers: list[DenseLayer] = field(default_factory=list)
    budget_scope: str = "whole_model"
    seed: int = 0
    search: dict[str, Any] = field(default_factory=dict)
    target: str = "trt"  # what the budget was counted on; sliced convs are dense: the cost is the MACs on every target
    nm_layers: list[LayerPlan] = field(default_factory=list)  # hybrid: N:M on layers of the narrower model

    @property
    def sliced_macs(self) -> int:
        """MACs of the narrower model (N:M not counted)."""
        return sum(l.macs_pruned for l in self.layers) + sum(d.macs for d in self.dense_layers)

    @property
    def macs_pruned(self) -> int:
        """MACs of the narrower model with its N:M layers at N/M (the MACs metric of N:M plans)."""
        return self.sliced_macs - sum(l.macs_dense - l.macs_pruned for l in self.nm_layers)

    @property
    def target_ratio(self) -> float:
        """The cost on the target: the narrower model's MACs, minus what its N:M layers save there."""
        saved = sum(l.macs_dense - layer_cost(self.target, l.macs_dense, l.n, l.m, l.weight_shape, l.precision)
                    for l in self.nm_layers)
        return (self.sliced_macs - saved) / self.macs_dense

    @property
    def nm_plan(self) -> Plan | None:
        """The N:M part as an N:M plan over the narrower model (masks, graph checks), or None."""
        if not self.nm_layers:
            return None
        return Plan(model=self.model, method=self.method, budget=self.budget, m=self.nm_layers[0].m,
                    reference_output=list(self.reference_output), layers=list(self.nm_layers), target=self.target)

    def validate(self) -> None:
        """One-line PlanError unless every group is consistent (``GroupPlan.validate``), a layer produces for at
        most one group and consumes from at most one, and the layer costs name the groups their layers belong to
        (a stream split over several groups, or producers that disagree, is refused)."""
        prod: dict[str, str] = {}
        cons: dict[str, str] = {}
        for g in self.groups:
            g.validate()
            for p in g.producers:
                if p in prod:
                    raise PlanError(f"channel plan: layer '{p}' is a producer of two groups ('{prod[p]}', "
                                    f"'{g.name}'): producers of one stream must be one group with the same units")
                prod[p] = g.name
            for c in g.consumers:
                if c in cons:
                    raise PlanError(f"channel plan: layer '{c}' reads two groups ('{cons[c]}', '{g.name}')")
                cons[c] = g.name
        sliced = {l.name: l.macs_pruned for l in self.layers} | {d.name: d.macs for d in self.dense_layers}
        for l in self.nm_layers:
            if l.name not in sliced:
                raise PlanError(f"channel plan: N:M layer '{l.name}' is not a layer of the plan")
            if l.macs_dense != sliced[l.name]:
                raise PlanError(f"channel plan: N:M layer '{l.name}' counts {l.macs_dense} MACs, the narrower "
                                f"layer has {sliced[l.name]}")
        for l in self.layers:
            if l.out_group != prod.get(l.name) and (l.out_group is not None or l.name in prod):
                raise PlanError(f"channel plan: layer '{l.name}' has out_group {l.out_group!r} but the groups say "
                                f"{prod.get(l.name)!r}")
            if l.in_group != cons.get(l.name) and (l.in_group is not None or l.name in cons):
                raise PlanError(f"channel plan: layer '{l.name}' has in_group {l.in_group!r} but the groups say "
                                f"{cons.get(l.name)!r}")

    @property
    def widths(self) -> dict[str, int]:
        """{group: kept units}: what the adapter's ``build`` takes as ``options["widths"]``."""
        return {g.name: g.kept_units for g in self.groups}

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STRUCTURED_PLAN_VERSION, "kind": STRUCTURED_KIND, "model": self.model, "method": self.method,
            "budget": self.budget, "budget_scope": self.budget_scope, "round_to": self.round_to, "seed": self.seed,
            "target": self.target,
            "reference_output": self.reference_output, "frames": self.frames,
            "macs": {"dense": self.macs_dense, "pruned": self.macs_pruned, "ratio": self.ratio,
                     "target_ratio": self.target_ratio,
                     "per_frame_dense": self.macs_dense / self.frames,
                     "per_frame_pruned": self.macs_pruned / self.frames},
            "widths": self.widths,
            "groups": [g.to_json() for g in self.groups],
            "layers": [asdict(l) | {"ratio": l.macs_pruned / l.macs_dense if l.macs_dense else 1.0}
                       for l in self.layers],
            "dense_layers": [asdict(d) for d in self.dense_layers],
            "nm_layers": [l.to_json() for l in self.nm_layers],
            "search": self.search,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StructuredPlan":
        if d.get("kind") != STRUCTURED_KIND:
            raise ValueError("not a structured plan (no \"kind\": \"structured\")")
        gp = {"name", "producer", "consumers", "unit", "dense_units", "kept", "producers", "producer_kept", "index"}
        lc = {"name", "macs_dense", "macs_pruned", "out_group", "in_group"}
        plan = cls(model=d["model"], method=d["method"], budget=float(d["budget"]), round_to=int(d["round_to"]),
                   reference_output=list(d["reference_output"]), frames=int(d["frames"]),
                   groups=[GroupPlan(**{k: v for k, v in g.items() if k in gp}) for g in d["groups"]],
                   layers=[LayerCost(**{k: v for k, v in l.items() if k in lc}) for l in d["layers"]],
                   dense_layers=[DenseLayer(**x) for x in d.get("dense_layers", [])],
                   budget_scope=d.get("budget_scope", "whole_model"), seed=int(d.get("seed", 0)),
                   search=dict(d.get("search", {})), target=str(d.get("target", "trt")),
                   nm_layers=[LayerPlan(**{k: v for k, v in l.items() if k in _LAYER_PLAN_FIELDS})
                              for l in d.get("nm_layers", [])])
        plan.validate()
        return plan
