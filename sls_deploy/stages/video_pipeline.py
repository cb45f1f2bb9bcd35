"""The video build (BasicVSR, StreamVSR): structured channel pruning through search -> finetune -> export ->
validate, with the bundle, manifest, stage skipping and resume conventions of the image build (pipeline.py).

- search: the dense base model's channel groups (declared by the adapter), their MACs at the reference
  resolution, unit importances (``ssl`` learned scales, ``l1`` / ``l1-global`` filter norms), kept units under
  the whole-model MAC budget, the narrower model built by the adapter and the kept weights sliced into it ->
  ``plan.json`` (a structured plan) and ``search.safetensors``.
- finetune: the narrower model trained on clips with ``temporal_l1`` -> ``model.safetensors``.
- export (video_export.py): FP32 ONNX of the adapter's export module (BasicVSR: the clip graph, StreamVSR: the
  step graph), plain narrower convs with the dense graph's op types; the dense graph goes to work/ for latency.
- validate (video_validate.py): ONNX Runtime vs PyTorch over eval clips, per-frame quality, latency, report.

A bundle's model is always the recipe's model options with the plan's widths (``load_video_model``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sls_deploy.core import atomic
from sls_deploy.core import distributed as dist
from sls_deploy.core.bundle import PLAN, WEIGHTS, Bundle, digest
from sls_deploy.core.checkpoints import load_weights, read_state_dict, save_weights
from sls_deploy.data.video import ClipSampler, resolve_clips
from sls_deploy.core.errors import PlanError, UsageError
from sls_deploy.models import ModelConfig
from sls_deploy.stages.pipeline import SEARCH_WEIGHTS, Log, check_resume, load_model, resolve_base_weights, restore_options
from sls_deploy.config.recipe import STRUCTURED_METHODS, Recipe, StructuredSection
from sls_deploy.pruning.nm.oneshot import check_budget
from sls_deploy.pruning.channels.structured import (ChannelScales, GroupCosts, l1_importance, select_global, select_uniform,
                                  slice_into, widths_of)
from sls_deploy.pruning.nm.plan import DenseLayer
from sls_deploy.pruning.channels.plan import GroupPlan, LayerCost, StructuredPlan
from sls_deploy.training.loop import TrainConfig, train
from sls_deploy.training.losses import temporal_l1

STAGES = ("search", "finetune", "export", "validate")
IMAGE_ONLY_OPTIONS = ("m", "n", "lam", "alpha", "target", "precisions", "calib", "calib_method")


@dataclass
class VideoBuildOptions:
    budget: float
    method: str | None = None  # ssl | l1 | l1-global; None: the recipe's structured.method
    round_to: int | None = None  # None: the recipe's
    temporal_weight: float | None = None  # None: the recipe's
    weights: str | None = None  # dense base weights; None: the recipe's shipped weights
    data: str | None = None  # training clips; None: the recipe's list
    eval_data: str | None = None
    steps: int | None = None  # finetune steps; None: the recipe's finetune.steps (ssl adds structured.ssl_steps)
    ssl_steps: int | None = None  # None: the recipe's structured.ssl_steps
    seed: int = 0
    progress: bool = True
    log: Log = field(default=print, repr=False)


def settings(recipe: Recipe, opts: VideoBuildOptions) -> StructuredSection:
    """The recipe's structured section with the options' method, round_to, temporal weight and ssl steps."""
    changes = {k: getattr(opts, k) for k in ("method", "round_to", "temporal_weight", "ssl_steps")
               if getattr(opts, k) is not None}
    return dataclasses.replace(recipe.structured, **changes)


def check_options(recipe: Recipe, opts: VideoBuildOptions) -> StructuredSection:
    if recipe.adapter.kind() != "video":
        raise UsageError(f"{recipe.describe_model()} is not a video model; its build is `sls-deploy build` "
                         "with an N:M method")
    try:
        check_budget(opts.budget)
    except PlanError as e:
        raise UsageError(str(e)) from None
    st = settings(recipe, opts)
    if st.method not in STRUCTURED_METHODS:
        raise UsageError(f"unknown method '{st.method}' for a video model (known: {', '.join(STRUCTURED_METHODS)})")
    if not isinstance(st.round_to, int) or st.round_to < 1:
        raise UsageError(f"--round-to must be an integer >= 1, not {st.round_to}")
    if not isinstance(st.ssl_steps, int) or st.ssl_steps < 1:
        raise UsageError(f"ssl steps must be an integer >= 1, not {st.ssl_steps}")
    if st.temporal_weight < 0:
        raise UsageError(f"--temporal-weight must be >= 0, not {st.temporal_weight:g}")
    if opts.steps is not None and opts.steps < 0:
        raise UsageError(f"--steps must be >= 0, not {opts.steps}")
    if dist.world_size() > 1:
        raise UsageError("video builds run in one process (no torchrun)")
    return st


def build_key(recipe: Recipe, opts: VideoBuildOptions) -> dict[str, Any]:
    return {"model": recipe.name, "arch": recipe.model.arch, "scale": recipe.scale, "budget": opts.budget,
            "method": settings(recipe, opts).method, "pruning": "structured"}


OPTION_KEYS = ("seed", "weights", "data", "eval_data", "steps", "ssl_steps", "round_to", "temporal_weight")


def options_record(opts: VideoBuildOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in OPTION_KEYS}


def options_from_bundle(bundle: Bundle, **overrides) -> VideoBuildOptions:
    m = bundle.require()
    key = m["build_key"]
    return restore_options(VideoBuildOptions(budget=key["budget"], method=key["method"]), m.get("options", {}),
                           OPTION_KEYS, overrides)


def model_config(recipe: Recipe, widths: dict[str, int] | None) -> ModelConfig:
    """The recipe's model with the given channel-group widths (a plan's)."""
    return dataclasses.replace(recipe.model, options={**recipe.model.options, "widths": dict(widths or {})})


def load_video_model(recipe: Recipe, weights: Path, widths: dict[str, int] | None) -> torch.nn.Module:
    """The recipe's model at the plan's widths with ``weights`` loaded (fit checked: a checkpoint of another
    width is a one-line CheckpointError naming the first mismatching key)."""
    cfg = model_config(recipe, widths)
    model = recipe.adapter.build(cfg)
    sd = recipe.adapter.convert_state_dict(read_state_dict(weights), cfg)
    load_weights(model, sd, f"{recipe.describe_model()} at the plan's widths")
    return model.eval()


def frames_per_run(example) -> int:
    """Frames per graph run: T of a clip input (N, T, C, H, W), else 1 (a step or image graph)."""
    first = example[0] if isinstance(example, tuple) else example
    return int(first.shape[1]) if first.dim() == 5 else 1


def _clip_sampler(recipe: Recipe, data: str, seed: int) -> ClipSampler:
    sec = recipe.finetune
    return ClipSampler(resolve_clips(data), recipe.scale, sec.lr_patch, recipe.model.options["clip_len"],
                       sec.batch_size, seed=seed)


# -- stage: search -----------------------------------------------------------------------------------------
def run_search(bundle: Bundle, recipe: Recipe, opts: VideoBuildOptions) -> StructuredPlan:
    st = check_options(recipe, opts)
    base = resolve_base_weights(recipe, opts.weights)
    data = opts.data or recipe.data_train
    inputs = digest({"key": build_key(recipe, opts), "base": atomic.sha256_file(base) if base.is_file() else None,
                     "ref": recipe.reference_output, "model": recipe.model.options, "seed": opts.seed,
                     "round_to": st.round_to,
                     **({"ssl": dataclasses.asdict(st), "data": data, "ft": recipe.finetune.__dict__}
                        if st.method == "ssl" else {})})
    if bundle.stage_is_current("search", inputs):
        opts.log("  up to date")
        return StructuredPlan.load(bundle.path(PLAN))
    t0 = time.perf_counter()
    adapter = recipe.adapter
    model = load_model(recipe, base)
    groups = adapter.channel_groups(model)
    if not groups:
        raise PlanError(f"{recipe.describe_model()} declares no channel groups to prune")
    h, w = recipe.reference_input_hw()
    example = adapter.example_input(recipe.model, h, w)
    costs = GroupCosts.measure(adapter.export_module(model), groups, example)
    l1 = {g.name: l1_importance(model, g) for g in groups}
    info: dict[str, Any] = {"lr_hw": [h, w], "importance": "l1 filter norm (mean |w| per unit)"}
    if st.method == "l1":
        keep = select_uniform(l1, costs, opts.budget, st.round_to)
        info["selection"] = "uniform kept fraction in every group"
    elif st.method == "l1-global":
        keep = select_global(l1, costs, opts.budget, st.round_to)
        info["selection"] = "one global threshold on per-group normalised importance"
    else:
        marks = select_global(l1, costs, opts.budget, st.round_to)  # fails fast on an unreachable budget
        importance, ssl_info = _ssl(bundle, recipe, opts, st, model, groups, marks, inputs, data)
        info.update(ssl_info)
        keep = select_global(importance, costs, opts.budget, st.round_to)
        info["kept_marked_units"] = {g: len(set(keep[g].tolist()) - set(marks[g].tolist())) for g in keep}
    widths = widths_of(keep)
    sliced = adapter.build(model_config(recipe, widths))
    slice_into(model, sliced, groups, keep)
    plan = _plan(recipe, opts, st, model, groups, costs, keep, frames_per_run(example), info)
    if plan.ratio > opts.budget * (1 + 1e-9):  # select_* guarantee it; the file must say so too
        raise PlanError(f"the plan's MACs ratio {plan.ratio:.4f} exceeds the budget {opts.budget:g}")
    save_weights(sliced, bundle.path(SEARCH_WEIGHTS), {"plan": st.method, "budget": str(opts.budget)})
    plan.save(bundle.path(PLAN))
    bundle.record_stage("search", inputs, [PLAN, SEARCH_WEIGHTS], time.perf_counter() - t0,
                        {"base_weights": str(base), "base_weights_sha256": atomic.sha256_file(base),
                         "init_weights": str(bundle.path(SEARCH_WEIGHTS))})
    return plan


def _ssl(bundle: Bundle, recipe: Recipe, opts: VideoBuildOptions, st: StructuredSection, model, groups, marks,
         inputs: str, data: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learned per-unit scales: the units outside ``marks`` get a growing L2 penalty for ``ssl_steps`` steps
    while everything trains; the scales are then folded into the weights. Returns {group: |scale|}."""
    scales = ChannelScales(model, groups, reg=st.reg, delta=st.delta, grow_every=st.grow_every, cap=st.cap,
                           lr=st.scale_lr)
    scales.mark(marks)
    sec = recipe.finetune
    ckpt = bundle.work / "search.ckpt"
    check_resume(ckpt, inputs, st.ssl_steps, None, opts.log, what="ssl search")
    cfg = TrainConfig(steps=st.ssl_steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                      seed=opts.seed)
    result = train(model, _clip_sampler(recipe, data, opts.seed), cfg, checkpoint=ckpt, resume=True,
                   run_key=inputs, controller=scales, desc="ssl search", progress=opts.progress,
                   loss_fn=temporal_l1(st.temporal_weight))
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


def _plan(recipe, opts, st, model, groups, costs: GroupCosts, keep, frames: int, info) -> StructuredPlan:
    widths = widths_of(keep)
    per_layer = costs.per_layer(widths)
    out_of = {g.producer: g.name for g in groups}
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
    return StructuredPlan(
        model=recipe.name, method=st.method, budget=opts.budget, round_to=st.round_to,
        reference_output=list(recipe.reference_output), frames=frames,
        groups=[GroupPlan(g.name, g.producer, list(g.consumers), int(getattr(g, "unit", 1)), costs.units[g.name],
                          [int(i) for i in keep[g.name].tolist()]) for g in groups],
        layers=layers, dense_layers=dense, seed=opts.seed, search=info)


def graph_spec(recipe: Recipe):
    """The adapter's ExportSpec at the recipe's opset (``recurrent`` kept)."""
    return dataclasses.replace(recipe.adapter.export_spec(recipe.model), opset=recipe.opset)


# -- stage: finetune ---------------------------------------------------------------------------------------
def finetune_steps(recipe: Recipe, opts: VideoBuildOptions) -> int:
    return recipe.finetune.steps if opts.steps is None else opts.steps


def run_finetune(bundle: Bundle, recipe: Recipe, opts: VideoBuildOptions, resume: bool | None = None) -> dict:
    """The narrower model, from the search's sliced weights, trained with temporal_l1 on clips (resumable)."""
    st = check_options(recipe, opts)
    bundle.verify([PLAN, SEARCH_WEIGHTS])
    plan = StructuredPlan.load(bundle.path(PLAN))
    init = bundle.path(SEARCH_WEIGHTS)
    sec, steps, data = recipe.finetune, finetune_steps(recipe, opts), opts.data or recipe.data_train
    inputs = digest({"plan": atomic.sha256_file(bundle.path(PLAN)), "init": atomic.sha256_file(init),
                     "steps": steps, "sec": sec.__dict__, "data": data, "seed": opts.seed,
                     "temporal_weight": st.temporal_weight, "clip_len": recipe.model.options["clip_len"]})
    if bundle.stage_is_current("finetune", inputs):
        opts.log("  up to date")
        return bundle.manifest()["stages"]["finetune"].get("result", {})
    ckpt = bundle.work / "finetune.ckpt"
    check_resume(ckpt, inputs, steps, resume, opts.log)
    t0 = time.perf_counter()
    model = load_video_model(recipe, init, plan.widths)
    info: dict[str, Any] = {"steps": 0, "resumed_from": 0, "seconds": 0.0, "final_loss": None,
                            "temporal_weight": st.temporal_weight}
    if steps > 0:
        cfg = TrainConfig(steps=steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                          seed=opts.seed)
        result = train(model, _clip_sampler(recipe, data, opts.seed + 1), cfg, checkpoint=ckpt, resume=True,
                       run_key=inputs, desc="finetune", progress=opts.progress,
                       loss_fn=temporal_l1(st.temporal_weight))
        info.update(steps=result.steps_done, resumed_from=result.resumed_from, seconds=round(result.seconds, 1),
                    final_loss=result.final_loss)
    save_weights(model, bundle.path(WEIGHTS), {"plan": plan.method, "budget": str(plan.budget)})
    bundle.record_stage("finetune", inputs, [WEIGHTS], time.perf_counter() - t0, {"result": info})
    if ckpt.exists():
        ckpt.unlink()
    return info


# -- build -------------------------------------------------------------------------------------------------
def _plan_line(plan: StructuredPlan) -> str:
    narrowed = [g for g in plan.groups if g.kept_units < g.dense_units]
    return (f"  plan: {plan.method}, {len(narrowed)} of {len(plan.groups)} groups narrowed, MACs "
            f"{plan.macs_pruned / plan.frames / 1e9:.2f} / {plan.macs_dense / plan.frames / 1e9:.2f} G per frame "
            f"(ratio {plan.ratio:.3f})")


def build(recipe: Recipe, opts: VideoBuildOptions, out: Path) -> dict:
    """The four stages into ``out``; finished stages are skipped, an interrupted ssl search or finetune resumes."""
    from sls_deploy.stages.video_export import run_export
    from sls_deploy.stages.video_validate import run_validate

    check_options(recipe, opts)
    for spec in (opts.data or recipe.data_train, opts.eval_data or recipe.data_eval):
        resolve_clips(spec)  # a missing folder is an error before anything is written
    bundle = Bundle(out)
    bundle.claim(build_key(recipe, opts), Path(recipe.path).read_text(), options_record(opts))
    stages = [("search", lambda: run_search(bundle, recipe, opts)),
              ("finetune", lambda: run_finetune(bundle, recipe, opts)),
              ("export", lambda: run_export(bundle, recipe, opts)),
              ("validate", lambda: run_validate(bundle, recipe, opts))]
    t_all, rep = time.perf_counter(), {}
    for i, (name, fn) in enumerate(stages, 1):
        t0 = time.perf_counter()
        opts.log(f"[{i}/{len(stages)}] {name} ...")
        result = fn()
        if name == "search":
            opts.log(_plan_line(result))
        if name == "validate":
            rep = result
        opts.log(f"  {name} done in {time.perf_counter() - t0:.1f}s")
    opts.log(f"build finished in {time.perf_counter() - t_all:.1f}s -> {out}")
    return rep
