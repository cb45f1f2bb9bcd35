"""The channel search: kept units of the adapter's channel groups under the whole-model MAC budget, the narrower
model built and the kept weights sliced into it (``search.safetensors``), and the plan that records them.

The steps a channel strategy (``channels.strategy``) composes: measure the groups (``measured``), rank units
before any training (``unit_ranking``), learn per-unit scales by training (``learned_scales``), read given units
(a nested family member: ``read_units_file``/``given_units``), and slice and record (``finish``). Everything the
stage provides comes through the ``SearchContext``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sls_deploy.core import atomic
from sls_deploy.core.errors import PlanError
from sls_deploy.core.safe_json import load_json
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import aligned_units, index_of, producers_of, widths_of
from sls_deploy.pruning.channels.importance import Importance, L1Importance, LearnedScales, ranking_for
from sls_deploy.pruning.channels.plan import GroupPlan, LayerCost, StructuredPlan
from sls_deploy.pruning.channels.scales import ChannelScales
from sls_deploy.pruning.channels.slicing import slice_into
from sls_deploy.pruning.nm.plan import DenseLayer
from sls_deploy.pruning.strategy import SEARCH_WEIGHTS, SearchContext


@dataclass
class Measured:
    """The model a channel search starts from, its groups and their costs, and the search's record so far."""

    model: torch.nn.Module
    groups: list
    costs: GroupCosts
    full: set  # groups kept at full width
    l1: dict  # {group: filter L1 norm} of the pruned groups
    example: Any
    given: tuple[Path, dict] | None
    info: dict
    widths: dict | None = None  # the kept widths, once selected
    hybrid: Any = None  # a hybrid plan's 2:4 part (pruning.hybrid.HybridPart)
    budget: float | None = None  # the channel budget the selection spent


def measured(ctx: SearchContext) -> Measured:
    s, recipe = ctx.settings, ctx.recipe
    adapter = recipe.adapter
    given = read_units_file(Path(s.units)) if s.units else None
    # a nested family member is sliced from the family's shared weights; the base stays its dense reference
    model = ctx.load_model(given[0] if given else ctx.base, device=ctx.device)
    groups = adapter.channel_groups(model)
    if not groups:
        raise PlanError(f"{recipe.describe_model()} declares no channel groups to prune")
    h, w = recipe.reference_input_hw()
    example = adapter.example_input(recipe.model, h, w)
    costs = GroupCosts.measure(adapter.export_module(model), groups, example)
    full = set(s.kept_full([g.name for g in groups]))
    l1 = {g.name: L1Importance()(model, g) for g in groups if g.name not in full}
    info: dict[str, Any] = {"lr_hw": [h, w], **L1Importance.info}
    if full:
        info["kept_full"] = sorted(full)
    return Measured(model, groups, costs, full, l1, example, given, info)


def unit_ranking(s, model, groups, costs: GroupCosts, full, sampler, loss) -> tuple[dict, Importance]:
    """The units' importance before any training, for the pruned groups, and its criterion: the one
    ``--selection`` names (``importance.RANKINGS``, e.g. Fisher saliency per MAC saved, on the loss's scale, not
    normalised; measured on batches from ``sampler(seed)`` with a seed of its own, so the training batches are
    not consumed, and ``loss`` or L1), else the filter L1 norm (normalised per group)."""
    imp = ranking_for(s.selection, lambda: sampler(s.seed + 7919), loss or torch.nn.functional.l1_loss)
    return imp.scores(model, groups, costs, skip=full), imp


def learned_scales(ctx: SearchContext, model, groups, marks) -> tuple[LearnedScales, dict[str, Any]]:
    """Learned per-unit scales: the units outside ``marks`` get a growing L2 penalty for ``ssl_steps`` steps
    while everything trains; the scales are then folded into the weights. Returns the |scale| criterion."""
    s, recipe = ctx.settings, ctx.recipe
    st = s.structured(recipe)
    scales = ChannelScales(model, groups, reg=st.reg, delta=st.delta, grow_every=st.grow_every, cap=st.cap,
                           lr=st.scale_lr, align=st.align)
    scales.mark(marks)
    sec = recipe.finetune
    ckpt = ctx.work / "search.ckpt"
    ctx.check_resume(ckpt, st.ssl_steps, "ssl search")
    result = ctx.train(model, ctx.sampler(s.seed), steps=st.ssl_steps, lr=sec.lr, warmup=sec.warmup,
                       checkpoint_every=sec.checkpoint_every, checkpoint=ckpt, controller=scales,
                       desc="ssl search", loss_fn=ctx.loss_fn())
    importance = scales.folded_importance
    if importance is None:  # not reached: train() always detaches (folds) its controller
        raise PlanError("the learned scales were not folded")
    marked = dict(scales.unimportant)
    info = {"ssl_steps": result.steps_done, "resumed_from": result.resumed_from,
            "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
            "marked_units": {k: int(f.sum()) for k, f in marked.items()},
            "final_reg": {k: round(v, 8) for k, v in scales.reg.items()},
            "scale_marked_mean": _mean([importance[k][f] for k, f in marked.items()]),
            "scale_kept_mean": _mean([importance[k][~f] for k, f in marked.items()]),
            **LearnedScales.info,
            "marks": "units below the budget's global L1 threshold"}
    if ckpt.exists():
        ckpt.unlink()
    return LearnedScales(importance), info


def _mean(parts: list[torch.Tensor]) -> float | None:
    t = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
    return float(t.mean()) if t.numel() else None


def finish(ctx: SearchContext, m: Measured, keep) -> tuple[StructuredPlan, torch.nn.Module]:
    """The narrower model with the kept weights sliced in, and its plan (groups kept full get every unit)."""
    keep.update({g: torch.arange(m.costs.units[g]) for g in m.full})  # full width
    widths = m.widths = widths_of(keep)
    sliced = ctx.build_model(widths)
    slice_into(m.model, sliced, m.groups, keep)
    plan = channel_plan(ctx, m.model, m.groups, m.costs, keep, ctx.frames_per_run(m.example), m.info)
    return plan, sliced


def save(ctx: SearchContext, plan: StructuredPlan, sliced) -> None:
    s = ctx.settings
    if plan.target_ratio > s.budget * (1 + 1e-9):  # the selection guarantees it; the file must say so too
        raise PlanError(f"the plan's cost ratio {plan.target_ratio:.4f} on --target {s.target} exceeds the budget "
                        f"{s.budget:g}")
    ctx.save_weights(sliced, SEARCH_WEIGHTS, {"plan": s.method, "budget": str(s.budget)})
    ctx.save_plan(plan)
    ctx.files.append(SEARCH_WEIGHTS)
    ctx.init = ctx.path(SEARCH_WEIGHTS)


def channel_plan(ctx: SearchContext, model, groups, costs: GroupCosts, keep, frames: int, info) -> StructuredPlan:
    s, recipe = ctx.settings, ctx.recipe
    widths = widths_of(keep)
    per_layer = costs.per_layer(widths)
    out_of = {p: g.name for g in groups for p in producers_of(g)}
    in_of = {c: g.name for g in groups for c in g.consumers}
    decls = {d.name: d for d in recipe.adapter.layers(model)}
    layers, dense = [], []
    for name, macs in costs.macs.items():
        if name in out_of or name in in_of:
            layers.append(LayerCost(name, macs, per_layer[name], out_of.get(name), in_of.get(name)))
        else:
            d = decls.get(name)
            reason = d.reason if d is not None and not d.prunable and d.reason else \
                "no channel group changes its channels"
            dense.append(DenseLayer(name, macs, reason))
    plan = StructuredPlan(
        model=recipe.name, method=s.method, budget=s.budget, round_to=s.round_to,
        reference_output=list(recipe.reference_output), frames=frames,
        groups=[GroupPlan(g.name, g.producer, list(g.consumers), int(getattr(g, "unit", 1)), costs.units[g.name],
                          [int(i) for i in keep[g.name].tolist()], list(producers_of(g)), index=index_of(g))
                for g in groups],
        layers=layers, dense_layers=dense, seed=s.seed, search=info, target=s.target)
    plan.validate()
    return plan


# -- given units (a nested family's member) ------------------------------------------------------------------
def units_record(shared: Path, units: dict[str, list[int]]) -> dict[str, Any]:
    """The kept-units file of a nested family member: the shared weights it is sliced from (path and sha256)
    and its kept units per group."""
    return {"shared_weights": str(Path(shared).resolve()), "shared_sha256": atomic.sha256_file(shared),
            "units": units}


def read_units_file(path: Path) -> tuple[Path, dict]:
    """(shared weights, {group: [indices]}) from a kept-units file (``units_record``); one-line PlanError on an
    unreadable file or shared weights that are missing or changed since."""
    raw = load_json(path, "kept units file", PlanError)
    try:
        if not isinstance(raw, dict) or not isinstance(raw.get("units"), dict):
            raise ValueError("not a kept-units record (no \"units\" object)")
        shared = Path(str(raw["shared_weights"]))
        sha = str(raw["shared_sha256"])
    except (ValueError, KeyError) as e:
        raise PlanError(f"kept units file {path}: {e}") from None
    if not shared.is_file():
        raise PlanError(f"kept units file {path}: its shared weights {shared} are missing")
    if atomic.sha256_file(shared) != sha:
        raise PlanError(f"kept units file {path}: its shared weights {shared} changed since it was written")
    return shared, raw["units"]


def given_units(raw: dict, path: Path, groups, units: dict[str, int], full) -> dict[str, torch.Tensor]:
    """{group: kept unit indices} from ``raw`` ({group: [indices]}, read from ``path``); a group kept full or
    absent stays whole. One-line PlanError on an unknown group or bad indices."""
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, idx in raw.items():
        if name not in by_name:
            raise PlanError(f"kept units file {path}: '{name}' is not a channel group")
        if name in full:
            continue
        keep[name] = aligned_units(by_name[name], idx, units[name], f"kept units file {path}, group '{name}'")
        if keep[name].numel() == 0:
            raise PlanError(f"kept units file {path}: group '{name}' keeps no unit")
    return {g.name: keep.get(g.name, torch.arange(units[g.name])) for g in groups if g.name not in full}
