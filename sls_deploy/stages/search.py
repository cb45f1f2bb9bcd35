"""The search stage: the plan under the budget, for either strategy on any modality -> plan.json.

- ``nm`` (sls / oneshot / srste): per-layer N of M over the adapter's prunable layers; sls trains while it
  searches and hands its weights on (``search.safetensors``).
- ``channels`` (ssl / l1 / l1-global): kept units of the adapter's channel groups under the whole-model MAC
  budget; the narrower model is built and the kept weights sliced into it (``search.safetensors``).

The training data comes from the modality (patches or clips), the model knowledge from the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sls_deploy.core import atomic, distributed as dist
from sls_deploy.core.bundle import PLAN
from sls_deploy.core.checkpoints import save_weights
from sls_deploy.core.errors import PlanError, UsageError
from sls_deploy.core.safe_json import load_json
from sls_deploy.modalities import registry as modalities
from sls_deploy.pruning.channels.plan import GroupPlan, LayerCost, StructuredPlan
from sls_deploy.pruning.channels.saliency import fisher_saliency, per_mac
from sls_deploy.pruning.channels.structured import (ChannelScales, GroupCosts, aligned_units, index_of,
                                                    l1_importance, producers_of, select_global, select_uniform,
                                                    slice_into, widths_of)
from sls_deploy.pruning.nm.plan import DenseLayer, Plan
from sls_deploy.pruning.hybrid import channel_budget, nm_layers_for, nm_saving
from sls_deploy.pruning.nm.search import plan_uniform, search_sls, split_layers
from sls_deploy.pruning.registry import load_plan
from sls_deploy.stages.models import fp32_islands, load_model, model_config, resolve_base_weights
from sls_deploy.stages.resume import check_resume
from sls_deploy.stages.skeleton import Run, StageOutput, run_stage
from sls_deploy.training.loop import TrainConfig, train

SEARCH_WEIGHTS = "search.safetensors"  # the weights finetuning starts from (sls-searched or sliced)


def run_search(run: Run) -> Plan | StructuredPlan:
    s, recipe = run.settings, run.recipe
    base = resolve_base_weights(recipe, s.weights)
    inputs: dict[str, Any] = {"key": s.build_key(recipe), "base": atomic.sha256_file(base) if base.is_file() else None,
                              "ref": recipe.reference_output, "model": recipe.model.options, "seed": s.seed,
                              "modality": s.modality}
    allowed, need = s.search_phase(recipe)
    if allowed < need and s.steps > 0:
        what = (f"the SLS search may take at most {allowed} steps instead of {need} (sls.max_search_steps)"
                if s.method == "sls" else
                f"{s.method}'s search phase takes {allowed} steps instead of {need} (structured.ssl_steps)")
        run.log(f"  --steps {s.steps} is short: {what}, so that finetuning gets at least {s.steps - allowed} "
                "(a quarter of --steps)")
    if s.strategy == "nm":
        inputs.update(n=s.n, target=s.target)
        if s.method == "sls":
            inputs.update(sls=s.sls(recipe).__dict__, max=allowed, data=s.data, ft=recipe.finetune.__dict__)
        body = _nm_body
    else:
        if dist.world_size() > 1:
            raise UsageError("channel pruning runs in one process (no torchrun)")
        if s.units:
            inputs["units"] = atomic.sha256_file(Path(s.units)) if Path(s.units).is_file() else s.units
        inputs.update(round_to=s.round_to, **({"keep_full": sorted(s.keep_full)} if s.keep_full else {}),
                      **({"selection": s.selection} if s.selection != "normalised" else {}))
        if s.method in ("ssl", "hybrid"):
            inputs.update(ssl=s.structured(recipe).__dict__, data=s.data, ft=recipe.finetune.__dict__,
                          target=s.target, precisions=list(s.precisions))
        body = _channels_body
    run_stage(run, "search", inputs, lambda key: body(run, base, key), all_ranks=True)
    return load_plan(run.bundle.path(PLAN))


def layer_precision(name: str, islands, precisions) -> str:
    """A layer's precision in the deployed graphs: "fp32" for an FP32 island or when only FP32 graphs are made."""
    return "fp32" if name in islands or not set(precisions) & {"fp16", "int8"} else "fp16/int8"


def _record(base: Path, init: Path) -> dict[str, Any]:
    """The search's record of its weights: the base by absolute path (it lives outside the bundle), the weights
    finetuning starts from (a bundle file is looked up in the bundle wherever it moves: ``Bundle.recorded_file``)."""
    base = Path(base).resolve()
    init = base if Path(init).resolve() == base else init
    return {"base_weights": str(base), "base_weights_sha256": atomic.sha256_file(base), "init_weights": str(init)}


# -- N:M ---------------------------------------------------------------------------------------------------
def _nm_body(run: Run, base: Path, key: str) -> StageOutput:
    s, recipe, bundle = run.settings, run.recipe, run.bundle
    model = load_model(recipe, base, device=run.compute.device)
    islands = fp32_islands(recipe, model)
    split = split_layers(recipe, model, s.m, s.target, {l.name: layer_precision(l.name, islands, s.precisions)
                                                       for l in recipe.adapter.layers(model)})
    files, init = [PLAN], base
    if s.method == "sls":
        data = modalities.sampler(recipe, s.modality, s.data, s.seed + 1000 * dist.rank())
        ckpt = bundle.work / "search.ckpt"
        plan, _ = search_sls(recipe, model, split, s.budget, s.sls(recipe), data,
                             max_steps=s.search_phase(recipe)[0], lr=recipe.finetune.lr,
                             checkpoint=ckpt, run_key=key, seed=s.seed, progress=run.progress,
                             amp=run.compute.amp, channels_last=run.compute.channels_last)
        plans = dist.gather([(l.name, l.n) for l in plan.layers])
        if any(p != plans[0] for p in plans):
            raise PlanError("the ranks of this torchrun job found different plans (non-deterministic search?)")
        if dist.is_main():
            save_weights(model, bundle.path(SEARCH_WEIGHTS), {"plan": "sls"})
            if ckpt.exists():
                ckpt.unlink()
        files.append(SEARCH_WEIGHTS)
        init = bundle.path(SEARCH_WEIGHTS)
    else:
        plan = plan_uniform(recipe, split, s.budget, s.m, s.method, n=s.n)
    plan.seed = s.seed
    plan.target = s.target
    plan.fp32_islands = islands
    for layer in plan.layers:
        layer.precision = layer_precision(layer.name, islands, s.precisions)
    if plan.target_ratio > s.budget * (1 + 1e-9):
        raise PlanError(f"the plan's cost on --target {s.target} ({plan.target_ratio:.4f}) exceeds the budget "
                        f"{s.budget:g}")
    plan.search["world_size"] = dist.world_size()
    if dist.is_main():
        plan.save(bundle.path(PLAN))
    return StageOutput(files, extra=_record(base, init))


# -- channels ----------------------------------------------------------------------------------------------
def _channels_body(run: Run, base: Path, key: str) -> StageOutput:
    s, recipe, bundle = run.settings, run.recipe, run.bundle
    adapter = recipe.adapter
    given = read_units_file(Path(s.units)) if s.units else None
    # a nested family member is sliced from the family's shared weights; the base stays its dense reference
    model = load_model(recipe, given[0] if given else base, device=run.compute.device)
    groups = adapter.channel_groups(model)
    if not groups:
        raise PlanError(f"{recipe.describe_model()} declares no channel groups to prune")
    h, w = recipe.reference_input_hw()
    example = adapter.example_input(recipe.model, h, w)
    costs = GroupCosts.measure(adapter.export_module(model), groups, example)
    full = set(s.kept_full([g.name for g in groups]))
    l1 = {g.name: l1_importance(model, g) for g in groups if g.name not in full}
    info: dict[str, Any] = {"lr_hw": [h, w], "importance": "l1 filter norm (mean |w| per unit)"}
    if full:
        info["kept_full"] = sorted(full)
    if given:
        keep = given_units(given[1], Path(s.units), groups, costs.units, full)
        info.update(shared_weights=str(given[0]), importance="none (the units are given)",
                    selection=f"given: the kept units of a nested family member ({Path(s.units).name}), one ranking "
                              "shared by every member")
        if s.method == "imported-channels":  # `import-pruned`: the kept channels of a model pruned by another tool
            info["selection"] = f"imported: the kept channels of a model pruned by another tool ({Path(s.units).name})"
    elif s.method == "l1":
        keep = select_uniform(l1, costs, s.budget, s.round_to, fill=True)
        info["selection"] = ("uniform kept fraction in every group; what rounding left of the budget is spent "
                             "widening the groups whose next units have the largest normalised L1 norm")
    elif s.method == "l1-global":
        keep = select_global(l1, costs, s.budget, s.round_to)
        info["selection"] = "one global threshold on per-group normalised importance"
    else:
        rank, normalize = unit_ranking(recipe, s, model, groups, costs, full)
        fisher = not normalize  # Fisher saliency is on the loss's scale: one raw threshold across groups
        hybrid = _Hybrid(run, model, costs, normalize=normalize) if s.method == "hybrid" else None
        budget = hybrid.channel_budget(rank) if hybrid else s.budget
        marks = select_global(rank, costs, budget, s.round_to, normalize=normalize)  # an unreachable budget fails
        importance, ssl_info = _learned_scales(run, model, groups, marks, key)
        info.update(ssl_info)
        if fisher:  # the kept units are the Fisher selection's: the growing penalty drove exactly the others to 0
            keep = marks
            info.update(importance="Fisher saliency per MAC saved (empirical Fisher of a per-unit gate)",
                        marks="units below the budget's global Fisher-per-MAC threshold",
                        selection="one global threshold on Fisher saliency per MAC saved; the marked units are "
                                  "driven to 0 by the growing penalty, then sliced away")
        else:
            learned = {k: v for k, v in importance.items() if k in l1}
            if hybrid:
                budget = hybrid.channel_budget(learned)
            keep = select_global(learned, costs, budget, s.round_to, normalize=s.selection == "normalised")
        if s.selection == "raw":
            info["selection"] = "one global threshold on the raw |scale| of every unit (SSL's public code)"
        info["kept_marked_units"] = {g: len(set(keep[g].tolist()) - set(marks[g].tolist())) for g in keep}
    keep.update({g: torch.arange(costs.units[g]) for g in full})  # full width
    widths = widths_of(keep)
    sliced = adapter.build(model_config(recipe, widths))
    slice_into(model, sliced, groups, keep)
    plan = _channel_plan(run, model, groups, costs, keep, modalities.frames_per_run(example), info)
    if s.method == "hybrid":
        plan.nm_layers = hybrid.nm_layers(widths)
        plan.search["hybrid"] = hybrid.describe(plan, budget)
        plan.validate()
    if plan.target_ratio > s.budget * (1 + 1e-9):  # the selection guarantees it; the file must say so too
        raise PlanError(f"the plan's cost ratio {plan.target_ratio:.4f} on --target {s.target} exceeds the budget "
                        f"{s.budget:g}")
    save_weights(sliced, bundle.path(SEARCH_WEIGHTS), {"plan": s.method, "budget": str(s.budget)})
    plan.save(bundle.path(PLAN))
    return StageOutput([PLAN, SEARCH_WEIGHTS], extra=_record(base, bundle.path(SEARCH_WEIGHTS)))


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


FISHER_BATCHES = 16  # training batches whose per-sample gradients estimate the Fisher saliency


def unit_ranking(recipe, s, model, groups, costs: GroupCosts, full) -> tuple[dict[str, torch.Tensor], bool]:
    """The units' importance before any training, for the pruned groups, and whether a global threshold on it
    must normalise each group: Fisher saliency per MAC saved with ``--selection fisher`` (on the loss's scale:
    not normalised; ``FISHER_BATCHES`` training batches drawn with their own seed, so the training batches are
    not consumed), else the filter L1 norm (normalised per group)."""
    if s.selection != "fisher":
        return {g.name: l1_importance(model, g) for g in groups if g.name not in full}, True
    data = modalities.sampler(recipe, s.modality, s.data, s.seed + 7919)
    loss = modalities.loss_fn(s.modality, s.temporal_weight) or torch.nn.functional.l1_loss
    sal = fisher_saliency(model, groups, (data.batch() for _ in range(FISHER_BATCHES)), loss)
    return per_mac({k: v for k, v in sal.items() if k not in full}, costs), False


class _Hybrid:
    """The 2:4 part of a hybrid plan: which layers of the narrower model the target accelerates, and the
    channel budget that leaves the whole plan within the budget (``pruning.hybrid``)."""

    def __init__(self, run: Run, model, costs: GroupCosts, normalize: bool = True):
        self.run, self.costs, self.normalize = run, costs, normalize
        s, recipe = run.settings, run.recipe
        islands = fp32_islands(recipe, model)
        self.precision_of = {d.name: layer_precision(d.name, islands, s.precisions)
                             for d in recipe.adapter.layers(model)}

    def shapes(self, widths) -> dict[str, tuple[int, ...]]:
        """{prunable layer: weight shape} of the model at ``widths`` (built on the meta device: no memory)."""
        recipe = self.run.recipe
        with torch.device("meta"):
            m = recipe.adapter.build(model_config(recipe, widths))
        mods = dict(m.named_modules())
        return {d.name: tuple(mods[d.name].weight.shape) for d in recipe.adapter.layers(m) if d.prunable}

    def nm_layers(self, widths):
        return nm_layers_for(self.run.settings.target, self.shapes(widths), self.costs.per_layer(widths),
                             self.precision_of)

    def cost(self, widths) -> float:
        return (self.costs.total(widths) - nm_saving(self.run.settings.target, self.nm_layers(widths))) \
            / self.costs.dense

    def channel_budget(self, importance) -> float:
        s = self.run.settings
        select_global(importance, self.costs, s.budget, s.round_to, self.normalize)  # unreachable: fails here

        def cost_at(b: float) -> float:
            return self.cost(widths_of(select_global(importance, self.costs, b, s.round_to, self.normalize)))

        return channel_budget(s.budget, cost_at)

    def describe(self, plan, budget: float) -> dict[str, Any]:
        s = self.run.settings
        n = len(plan.nm_layers)
        return {"channel_budget": round(budget, 6), "layers_2to4": n, "target": s.target,
                "note": (f"{n} layers of the narrower model at 2:4 (the target accelerates them)" if n else
                         f"no 2:4: the target ({s.target}) is predicted to accelerate no layer of the narrower "
                         "model, so the hybrid plan is channels only")}


def _learned_scales(run: Run, model, groups, marks, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learned per-unit scales: the units outside ``marks`` get a growing L2 penalty for ``ssl_steps`` steps
    while everything trains; the scales are then folded into the weights. Returns {group: |scale|}."""
    s, recipe = run.settings, run.recipe
    st = s.structured(recipe)
    scales = ChannelScales(model, groups, reg=st.reg, delta=st.delta, grow_every=st.grow_every, cap=st.cap,
                           lr=st.scale_lr, align=st.align)
    scales.mark(marks)
    sec = recipe.finetune
    ckpt = run.bundle.work / "search.ckpt"
    check_resume(ckpt, key, st.ssl_steps, None, run.log, what="ssl search")
    cfg = TrainConfig(steps=st.ssl_steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                      seed=s.seed, amp=run.compute.amp, channels_last=run.compute.channels_last)
    result = train(model, modalities.sampler(recipe, s.modality, s.data, s.seed), cfg, checkpoint=ckpt,
                   resume=True, run_key=key, controller=scales, desc="ssl search", progress=run.progress,
                   loss_fn=modalities.loss_fn(s.modality, s.temporal_weight))
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
            "importance": "|learned scale| per unit after the growing penalty",
            "selection": "one global threshold on per-group normalised |scale|",
            "marks": "units below the budget's global L1 threshold"}
    if ckpt.exists():
        ckpt.unlink()
    return importance, info


def _mean(parts: list[torch.Tensor]) -> float | None:
    t = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
    return float(t.mean()) if t.numel() else None


def _channel_plan(run: Run, model, groups, costs: GroupCosts, keep, frames: int, info) -> StructuredPlan:
    s, recipe = run.settings, run.recipe
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
