"""Validate, clip and step modalities (video): does the pruned graph ship?

- ONNX Runtime vs PyTorch over every eval clip window (``clip_len`` frames): the clip graph runs the window at
  once; the step graph is driven frame by frame, its recurrent outputs fed back as the spec says
  (``ExportSpec.recurrent``); max abs difference against the PyTorch pruned model, tolerance
  ``validate.fp32_atol``.
- per-frame Y-PSNR/SSIM of bicubic, the dense base and the pruned model on the eval clips (and of the ONNX
  graph), with the per-frame means along the recurrence;
- latency of the dense and the pruned FP32 graphs in ONNX Runtime, interleaved in one run, per frame at the
  recipe's reference LR size;
- report.json / report.md / report.html and a per-group kept-width chart.

``check_video_report`` raises ValidationError naming the first failed check.
"""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import torch

from sls_deploy.core import atomic
from sls_deploy.report import document as report_mod
from sls_deploy.report import plots as report_plots
from sls_deploy.core.bundle import ONNX, PLAN, REPORT_JSON, REPORT_MD, WEIGHTS, Bundle, digest
from sls_deploy.core.device import model_device
from sls_deploy.core.opening import open_for_use
from sls_deploy.data.images import dims
from sls_deploy.data.video import read_frames, resolve_clips
from sls_deploy.core.errors import DataError, UsageError, ValidationError
from sls_deploy.core.safe_json import load_json
from sls_deploy.config.recipe import Recipe
from sls_deploy.pruning.registry import load_plan, strategy_of
from sls_deploy.backends.drive import clip_infer
from sls_deploy.backends.loading import graph_spec, load_model, plan_widths
from sls_deploy.backends.runtime import onnx_runner
from sls_deploy.stages.export import DENSE_ONNX, dense_graph
from sls_deploy.stages.skeleton import Run
from sls_deploy.stages.validate_common import (REPORT_HTML, ValidateOptions, current_graph_files, plan_rows,
                                               progress_bar)
from sls_deploy.stages.validate_gate import quality_gate
from sls_deploy.modalities.clip import VideoQuality, bicubic_clip_infer, evaluate_clips
from sls_deploy.modalities.drift import drift



def _torch_infer(model, record: list | None = None):
    """The model on its device as a clip function: inputs moved there, outputs back on the CPU."""
    device = model_device(model)

    def infer(lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(lr.to(device)).cpu()
        if record is not None:
            record.append(out.numpy())
        return out

    return infer


def validate_clips(run: Run, vopts: ValidateOptions) -> dict:
    """Every check and the report files; returns report.json's dict (``check_video_report`` says if it ships)."""
    bundle, recipe = run.bundle, run.recipe
    if vopts.backend != "ort":
        raise UsageError(f"--backend {vopts.backend} is not available for video bundles (use ort)")
    m = bundle.require()
    graph_files = current_graph_files(bundle, m)
    open_for_use(bundle.root, [PLAN, WEIGHTS, *graph_files.values()])  # hashes, and onnx.checker on each graph
    plan = load_plan(bundle.path(PLAN))
    base = bundle.recorded_file("search", "base_weights")
    eval_spec = run.settings.eval_data
    val, T = recipe.validate, int(recipe.model.options["clip_len"])
    runs = vopts.latency_runs or val.latency_runs
    warmup = val.latency_warmup if vopts.latency_warmup is None else vopts.latency_warmup
    inputs = digest({f: atomic.sha256_file(bundle.path(f)) for f in (PLAN, WEIGHTS, *graph_files.values())} | {
        "base": atomic.sha256_file(base), "eval": eval_spec, "validate": repr(val), "clip_len": T,
        "channel": recipe.metric_channel, "latency": [vopts.latency, runs, warmup, vopts.threads]})
    if bundle.stage_is_current("validate", inputs):
        run.log("  up to date")
        return load_json(bundle.path(REPORT_JSON), "report")
    t0 = time.perf_counter()
    clips = resolve_clips(eval_spec)
    need = 11 + 2 * recipe.scale
    for c in clips:  # SSIM's 11x11 window after the border crop
        h, w = read_frames(c, 0, 1).shape[1:3]
        if min(h, w) < need:
            raise DataError(f"eval clip {c.name} has frames {dims(w, h)}; evaluation needs at least {need} px on "
                            "each side")
    device = run.compute.device  # the PyTorch reference and, with onnxruntime-gpu on a GPU, ONNX Runtime too
    dense = load_model(recipe, base, device=device)
    pruned = load_model(recipe, bundle.path(WEIGHTS), plan_widths(plan), device)
    spec = graph_spec(recipe)
    scale, ch = recipe.scale, recipe.metric_channel
    bar = progress_bar(run.progress, (4 + len(graph_files) - 1) * len(clips) + (runs if vopts.latency else 0))
    stack = contextlib.ExitStack()  # the graphs' runners (Polygraphy OnnxrtRunner, the TensorRT path's interface)
    try:
        quality: dict[str, VideoQuality] = {}
        torch_out: list[np.ndarray] = []
        for name, infer in (("bicubic", bicubic_clip_infer(scale)), ("dense", _torch_infer(dense)),
                            ("pruned", _torch_infer(pruned, torch_out))):
            quality[name] = evaluate_clips(_ticking(infer, bar), clips, T, scale, ch)
        graph_run = clip_infer(stack.enter_context(onnx_runner(bundle.path(ONNX), device)), spec)
        diffs: list[float] = []

        def onnx_infer(lr):
            got = graph_run(lr)
            ref = torch_out[len(diffs)]
            if got.shape != ref.shape:
                raise ValidationError(f"the ONNX graph's output is {got.shape}, PyTorch's {ref.shape}")
            diffs.append(float(np.abs(got - ref).max()))
            return got

        quality["onnx"] = evaluate_clips(_ticking(onnx_infer, bar), clips, T, scale, ch, with_ssim=False)
        whole = whole_clip_check(graph_run, pruned, clips[0], T, scale, bool(spec.recurrent))
        drifted = drift(_torch_infer(dense), _torch_infer(pruned), clips[0], scale, ch)
        precisions = {}
        for p, f in graph_files.items():  # FP16 / INT8 graphs: PSNR drop below the FP32 PyTorch model
            if p == "fp32":
                continue
            q = evaluate_clips(_ticking(clip_infer(stack.enter_context(onnx_runner(bundle.path(f), device)), spec),
                                        bar),
                               clips, T, scale, ch, with_ssim=False)
            drop = quality["pruned"].psnr - q.psnr
            precisions[p] = {"file": f, f"psnr_{ch}": q.psnr, "drop_db": drop, "limit_db": val.max_drop(p),
                             "passed": drop <= val.max_drop(p)}
        dense_sha = m["stages"]["search"].get("base_weights_sha256") or atomic.sha256_file(base)
        frames = int(m["stages"].get("export", {}).get("result", {}).get("frames_per_run", getattr(plan, "frames", 1)))
        latency = (_latency(bundle, recipe, dense, dense_sha, spec, frames, vopts, runs, warmup, bar.update, device)
                   if vopts.latency else {"skipped": "--no-latency"})
    finally:
        stack.close()
        bar.close()
    rep = _report(bundle, recipe, plan, m, quality, clips, T, diffs, latency, spec, whole, frames, precisions)
    rep["drift"] = drifted | {"how": "PyTorch dense and pruned models over every frame of the first eval clip, the "
                                     "recurrent state carried through all of it (the step graph runs the same "
                                     "within onnx_vs_torch.whole_clip.max_abs)"}
    images = {report_plots.FRAMES_PLOT: lambda p: report_plots.plot_per_frame(rep, p),
              report_plots.DRIFT_PLOT: lambda p: report_plots.plot_drift(rep, p)}
    if rep["groups"]:
        images[report_plots.WIDTHS_PLOT] = lambda p: report_plots.plot_group_widths(rep, p)
    for name, draw in images.items():
        draw(bundle.path(name))
    atomic.write_json(bundle.path(REPORT_JSON), rep)
    atomic.write_text(bundle.path(REPORT_MD), report_mod.render_markdown(rep))
    atomic.write_text(bundle.path(REPORT_HTML), report_mod.render_html(rep, {n: bundle.path(n) for n in images}))
    bundle.record_stage("validate", inputs, [REPORT_JSON, REPORT_MD, REPORT_HTML, *images], time.perf_counter() - t0,
                        {"compute": run.compute.evaluating().record()})
    return rep


def _ticking(infer, bar):
    def run(lr):
        out = infer(lr)
        bar.update(1)
        return out

    return run


def whole_clip_check(run, model, clip, T: int, scale: int, streaming: bool) -> dict:
    """ONNX Runtime vs PyTorch over every frame of one whole eval clip: the step graph driven through all of it
    (its hidden state carried the whole way), the fixed-T clip graph over consecutive T-frame windows."""
    from sls_deploy.data.video import load_clip_pair

    _, lr = load_clip_pair(clip, None, scale)
    n = lr.shape[1] if streaming else lr.shape[1] // T * T
    worst = 0.0
    for s in ([0] if streaming else range(0, n, T)):
        x = lr[:, s:s + (n if streaming else T)]
        ref = _torch_infer(model)(x).numpy()
        worst = max(worst, float(np.abs(run(x) - ref).max()))
    return {"clip": clip.name, "frames": int(n), "max_abs": worst}


def _report(bundle, recipe, plan, manifest, q: dict[str, VideoQuality], clips, T, diffs, latency,
            spec, whole: dict, f: int, precisions: dict) -> dict:
    val = recipe.validate
    max_abs = max(max(diffs), whole["max_abs"])
    stages = manifest.get("stages", {})
    groups, widths = strategy_of(plan).report_widths(plan)
    rep = {
        "kind": "video", "model": recipe.name, "arch": recipe.model.arch, "graph": "step" if spec.recurrent else "clip",
        "budget": plan.budget, "method": plan.method, "round_to": getattr(plan, "round_to", None),
        "m": getattr(plan, "m", None),
        "macs": {"unit": "GMACs per frame", "dense": plan.macs_dense / f / 1e9, "pruned": plan.macs_pruned / f / 1e9,
                 "ratio": plan.ratio, "reference_output": plan.reference_output, "budget_scope": plan.budget_scope,
                 "frames_per_graph_run": f},
        "search": plan.search,
        "psnr": {"bicubic": q["bicubic"].psnr, "dense": q["dense"].psnr, "pruned": q["pruned"].psnr,
                 "pruned_onnx": q["onnx"].psnr, "channel": recipe.metric_channel, "crop_border": recipe.scale,
                 "eval_clips": [c.name for c in clips], "frames_per_clip": T,
                 "per_frame_mean": {k: q[k].per_frame_mean for k in ("bicubic", "dense", "pruned")},
                 "per_clip": {c: {k: q[k].per_clip[c]["psnr"] for k in ("bicubic", "dense", "pruned")}
                              for c in q["pruned"].per_clip}},
        "ssim": {"bicubic": q["bicubic"].ssim, "dense": q["dense"].ssim, "pruned": q["pruned"].ssim,
                 "channel": recipe.metric_channel,
                 "per_frame_mean": {k: q[k].per_frame_ssim_mean for k in ("bicubic", "dense", "pruned")}},
        "onnx_vs_torch": {"backend": "onnxruntime fp32", "graph": "step" if spec.recurrent else "clip",
                          "max_abs": max_abs, "tolerance": val.fp32_atol, "passed": max_abs <= val.fp32_atol,
                          "frames": T, "per_clip": dict(zip([c.name for c in clips], diffs)), "whole_clip": whole,
                          "driven": ("frame by frame, recurrent outputs fed back " + json.dumps(dict(spec.recurrent))
                                     if spec.recurrent else "whole window at once")},
        "latency": latency,
        "groups": groups,
        "widths": widths,
        "layers": plan_rows(plan),
        "dense_layers": [{"name": d.name, "macs": d.macs, "reason": d.reason} for d in plan.dense_layers],
        "export": {k: v for k, v in stages.get("export", {}).get("result", {}).items() if k != "convs"},
        "finetune": stages.get("finetune", {}).get("result", {}),
        "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
        "precisions": precisions,
    }
    ch = recipe.metric_channel
    graphs = {"fp32": q["onnx"].psnr, **{p: v[f"psnr_{ch}"] for p, v in precisions.items()}}
    rep["quality_gate"] = quality_gate(val, "bicubic", q["bicubic"].psnr, q["dense"].psnr, q["pruned"].psnr, graphs, ch)
    rep["checks"] = {"onnx_vs_torch": rep["onnx_vs_torch"]["passed"], "budget": plan.ratio <= plan.budget + 1e-9,
                     **{f"{p}_psnr_drop": v["passed"] for p, v in precisions.items()},
                     "quality_gate": rep["quality_gate"]["passed"]}
    return rep


def _latency(bundle: Bundle, recipe: Recipe, dense, dense_sha: str, spec, frames: int, vopts: ValidateOptions,
             runs: int, warmup: int, progress, device=None) -> dict:
    """Dense vs pruned FP32 graphs in ONNX Runtime, interleaved, per frame at each latency size (labelled with
    the provider and the device they ran on)."""
    from sls_deploy.backends.latency import ort_call, time_side_by_side
    from sls_deploy.backends.providers import describe
    from sls_deploy.backends.sessions import release_shared_arena, timed_session
    from sls_deploy.core.device import device_name

    dense_path = dense_graph(bundle, recipe, dense, dense_sha)
    sessions = {}
    for name, path in (("dense", dense_path), ("pruned", bundle.path(ONNX))):
        sessions[name], threads = timed_session(path, vopts.threads, device)
    sizes = list(recipe.validate.latency_sizes or [recipe.reference_input_hw()])
    where = describe(sessions["pruned"], device)
    out: dict = {"backend": "onnxruntime", **where, "device_name": device_name(torch.device(where["device"])),
                 "threads": threads, "warmup": warmup, "runs": runs,
                 "frames_per_run": frames, "graphs": {"dense": f"work/{DENSE_ONNX} (FP32)", "pruned": f"{ONNX} (FP32)"},
                 "sizes": []}
    for h, w in sizes:
        x = recipe.adapter.example_input(recipe.model, h, w)
        args = x if isinstance(x, tuple) else (x,)
        feed = {n: a.numpy() for n, a in zip(spec.input_names, args)}
        t = time_side_by_side({k: ort_call(s, feed) for k, s in sessions.items()}, warmup, runs,
                              progress=progress if len(sizes) == 1 else None)
        row = {"lr_hw": [h, w]}
        for k in ("dense", "pruned"):
            row[k] = {"median_ms_per_frame": t[k].median_ms / frames, "p90_ms_per_frame": t[k].p90_ms / frames,
                      "frames_per_s": frames * t[k].images_per_s, "median_ms_per_run": t[k].median_ms,
                      "runs": len(t[k].runs_ms)}
        row["ratio_pruned_over_dense"] = t["pruned"].median_ms / t["dense"].median_ms
        out["sizes"].append(row)
    small = recipe.adapter.example_input(recipe.model, 16, 16)
    release_shared_arena(sessions.values(), {n: a.numpy() for n, a in
                                             zip(spec.input_names, small if isinstance(small, tuple) else (small,))})
    return out


def check_video_report(rep: dict) -> None:
    """Raise ValidationError naming the first failed check."""
    o = rep["onnx_vs_torch"]
    if not o["passed"]:
        raise ValidationError(f"check onnx_vs_torch failed: ONNX Runtime differs from PyTorch by {o['max_abs']:.2e} "
                              f"over the eval clips (> tolerance {o['tolerance']:.0e}); see report.json")
    for p, v in rep.get("precisions", {}).items():
        if not v["passed"]:
            raise ValidationError(f"check {p}_psnr_drop failed: the {p} graph is {v['drop_db']:.3f} dB below the FP32 "
                                  f"PyTorch model on the eval clips (> {v['limit_db']:g} dB); see report.json")
    if not rep.get("checks", {}).get("budget", True):
        raise ValidationError(f"check budget failed: MACs ratio {rep['macs']['ratio']:.4f} exceeds the budget "
                              f"{rep['budget']:g}")
