"""Validate, image modality: does this bundle ship? Accuracy at every deployment shape, latency side by side, report.

Reads the bundle's plan, weights and graphs (never the search or training internals), runs the chosen backend
and the PyTorch reference, and writes report.json / report.md / report.html with the plots. A failing check
makes ``check_report`` raise with the check's name.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from sls_deploy.core import atomic
from sls_deploy.report import document as report_mod
from sls_deploy.report import plots as report_plots
from sls_deploy.core.bundle import ONNX, PLAN, REPORT_JSON, REPORT_MD, WEIGHTS, Bundle, digest
from sls_deploy.core.errors import SlsError
from sls_deploy.core.memory import release_freed_memory
from sls_deploy.core.opening import open_for_use
from sls_deploy.core.safe_json import load_json
from sls_deploy.data import load_pair, resolve_images
from sls_deploy.data.images import check_eval_size, check_pixels, conversion_note
from sls_deploy.modalities.image import baseline_infer, evaluate, torch_infer
from sls_deploy.trt.outlook import predicted_benefit
from sls_deploy.config.recipe import Recipe
from sls_deploy.pruning.registry import load_plan, strategy_of
from sls_deploy.backends.loading import graph_spec, load_model, plan_widths
from sls_deploy.backends.runners import Limits, check_shapes
from sls_deploy.backends.runtime import ort_infer
from sls_deploy.core.vocabulary import PRECISIONS
from sls_deploy.stages.export import DENSE_ONNX, dense_graph
from sls_deploy.stages.skeleton import Run
from sls_deploy.stages.validate_common import (LAYERS_JSON, REPORT_HTML, ValidateOptions, current_graph_files,
                                               plan_rows, progress_bar)
from sls_deploy.stages.validate_gate import quality_gate

MAX_EVAL_PIXELS = 4 * 2**20  # HR pixels of one eval image (4 MP, e.g. 2048x2048): bounded memory


def shape_sizes(recipe: Recipe) -> list[tuple[str, tuple[int, int]]]:
    """The profile's min / opt / max, the odd size, then the extra sizes (each size once)."""
    out, seen = [], set()
    for label, hw in [*recipe.engine.profile_sizes().items(), ("odd", recipe.validate.odd_size),
                      *(("extra", s) for s in recipe.validate.sizes)]:
        if hw not in seen:
            seen.add(hw)
            out.append((label, hw))
    return out


def validate_images(run: Run, vopts: ValidateOptions) -> dict:
    """Every check and the report files; returns report.json's dict (``check_report`` says if it ships)."""
    bundle, recipe = run.bundle, run.recipe
    m = bundle.require()
    graph_files = current_graph_files(bundle, m, need_graphs=vopts.backend != "torch")
    open_for_use(bundle.root, [PLAN, WEIGHTS, *graph_files.values()])  # hashes, and onnx.checker on each graph
    plan = load_plan(bundle.path(PLAN))
    base = bundle.recorded_file("search", "base_weights")
    eval_spec = run.settings.eval_data
    val = recipe.validate
    runs = vopts.latency_runs or val.latency_runs
    warmup = val.latency_warmup if vopts.latency_warmup is None else vopts.latency_warmup
    inputs = digest({f: atomic.sha256_file(bundle.path(f)) for f in (PLAN, WEIGHTS, *graph_files.values())} | {
        "base": atomic.sha256_file(base), "eval": eval_spec, "validate": repr(val), "engine": repr(recipe.engine),
        "channel": recipe.metric_channel, "backend": vopts.backend,
        "engine_layers": atomic.sha256_file(bundle.path(LAYERS_JSON)) if bundle.path(LAYERS_JSON).is_file() else None, "latency": [vopts.latency, runs, warmup,
                                                                                 vopts.threads]})
    if bundle.stage_is_current("validate", inputs):
        run.log("  up to date")
        return load_json(bundle.path(REPORT_JSON), "report")
    t0 = time.perf_counter()
    eval_files = resolve_images(eval_spec)
    for f in eval_files:  # bounded memory: every eval image runs whole at every deployment shape
        check_pixels(f, MAX_EVAL_PIXELS, "eval image")
        check_eval_size(f, recipe.scale, recipe.adapter.min_input_size(recipe.model))
    notes = [f"{f.name}: {n}" for f in eval_files if (n := conversion_note(f))]
    device = run.compute.device  # the PyTorch reference and, with onnxruntime-gpu on a GPU, ONNX Runtime too
    dense = load_model(recipe, base, device=device)
    pruned = load_model(recipe, bundle.path(WEIGHTS), plan_widths(plan), device)
    scale, ch = recipe.scale, recipe.metric_channel
    deg = recipe.adapter.degradation(recipe.model)
    sizes = shape_sizes(recipe)
    bar = progress_bar(run.progress, len(sizes) * len(eval_files) + (runs if vopts.latency else 0))
    try:
        shapes = _shape_checks(bundle, recipe, pruned, graph_files, vopts.backend, eval_files, sizes, bar.update, deg,
                               device)
        refs = {}
        for f in eval_files:
            hr, lr = load_pair(f, scale, deg)
            with torch.no_grad():
                refs[f.name] = (hr, lr, torch_infer(pruned)(lr).clamp(0, 1).numpy())
        io = (graph_spec(recipe).input_names[0], graph_spec(recipe).output_names[0])
        precisions = ({p: precision_quality(bundle.path(f), refs, scale, ch, io, device) | {"file": f}
                       for p, f in graph_files.items()} if vopts.backend == "ort" else {})
        q_bic = evaluate(baseline_infer(deg), eval_files, scale, ch, degradation=deg)
        q_dense = evaluate(torch_infer(dense), eval_files, scale, ch, degradation=deg)
        q_pruned = evaluate(torch_infer(pruned), eval_files, scale, ch, degradation=deg)
        release_freed_memory()  # the latency sessions' arena comes on top of what is resident now
        latency = (_latency(bundle, recipe, dense, pruned, atomic.sha256_file(base), vopts, runs, warmup, bar.update,
                            device)
                   if vopts.latency
                   else {"skipped": "--no-latency"})
    finally:
        bar.close()
    fp32_rows = [s for s in shapes if s.precision == "fp32"]
    max_abs = max(s.max_abs for s in fp32_rows)
    stages = m.get("stages", {})
    export_info = stages.get("export", {}).get("result", {})
    layers = plan_rows(plan)
    _merge_engine_layers(bundle, layers)
    rep = {
        "model": recipe.name, "budget": plan.budget, "method": plan.method, "m": getattr(plan, "m", None),
        "macs": {"unit": "GMACs", "dense": plan.macs_dense / 1e9, "pruned": plan.macs_pruned / 1e9,
                 "ratio": plan.ratio, "trt_2to4_ratio": getattr(plan, "trt_2to4_ratio", plan.ratio),
                 "target": plan.target, "target_ratio": plan.target_ratio,
                 "reference_output": plan.reference_output, "budget_scope": plan.budget_scope},
        "search": plan.search,
        "baseline": deg.name,  # what "bicubic" below measured: the degradation's trivial restoration
        "psnr": {"bicubic": q_bic.psnr, "dense": q_dense.psnr, "pruned": q_pruned.psnr,
                 "pruned_onnx": precisions.get("fp32", {}).get(f"psnr_{ch}"), "channel": ch, "crop_border": scale,
                 "eval_images": [p.name for p in eval_files],
                 "per_image": {k: {"bicubic": q_bic.per_image[k]["psnr"], "dense": q_dense.per_image[k]["psnr"],
                                   "pruned": v["psnr"]} for k, v in q_pruned.per_image.items()}},
        "ssim": {"bicubic": q_bic.ssim, "dense": q_dense.ssim, "pruned": q_pruned.ssim, "channel": ch},
        "backend": vopts.backend,
        "onnx_vs_torch": {"backend": fp32_rows[0].backend, "max_abs": max_abs, "tolerance": val.fp32_atol,
                          "passed": max_abs <= val.fp32_atol,
                          "sizes": [{"lr_hw": list(s.size), "output_shape": list(s.output_shape),
                                     "max_abs": s.max_abs, "mean_abs": s.mean_abs} for s in fp32_rows]},
        "shapes": [s.to_json() for s in shapes],
        "latency": latency,
        "graph": {k: v for k, v in export_info.items() if k not in ("graph_sparsity", "graphs")},
        "precisions": precisions,
        "layers": layers,
        "dense_layers": [{"name": d.name, "macs": d.macs, "reason": d.reason} for d in plan.dense_layers],
        "prediction": predicted_benefit(layers, plan.macs_dense) if hasattr(plan, "m") else {},
        "notes": notes,
        "finetune": stages.get("finetune", {}).get("result", {}),
        "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
        "tensorrt": ("per-layer TensorRT columns from engine/layers.json" if bundle.path(LAYERS_JSON).is_file()
                     else "no engine in this bundle (the engine stage needs TensorRT; see README)"),
    }
    rep["groups"], rep["widths"] = strategy_of(plan).report_widths(plan)
    channels = bool(rep["widths"])
    rep["quality_gate"] = quality_gate(val, deg.name, q_bic.psnr, q_dense.psnr, q_pruned.psnr,
                                       {p: v[f"psnr_{ch}"] for p, v in precisions.items()}, ch)
    rep["tradeoff"] = report_plots.tradeoff_points(rep, bundle.root)
    images = {
        **({report_plots.WIDTHS_PLOT: lambda p: report_plots.plot_group_widths(rep, p)} if channels else
           {report_plots.LAYER_PLOT: lambda p: report_plots.plot_layer_density(rep, p)}),
        report_plots.TRADEOFF_PLOT: lambda p: report_plots.plot_tradeoff(rep, p),
        report_plots.CROP_PLOT: lambda p: report_plots.plot_crop(eval_files[0], scale, torch_infer(dense),
                                                                 torch_infer(pruned), p, degradation=deg),
    }
    for name, draw in images.items():
        draw(bundle.path(name))
    atomic.write_json(bundle.path(REPORT_JSON), rep)
    atomic.write_text(bundle.path(REPORT_MD), report_mod.render_markdown(rep))
    atomic.write_text(bundle.path(REPORT_HTML), report_mod.render_html(rep, {n: bundle.path(n) for n in images}))
    bundle.record_stage("validate", inputs, [REPORT_JSON, REPORT_MD, REPORT_HTML, *images],
                        time.perf_counter() - t0, {"compute": run.compute.evaluating().record()})
    return rep


def _shape_checks(bundle: Bundle, recipe: Recipe, pruned, graph_files: dict[str, str], backend: str, files,
                  sizes, progress, degradation, device=None) -> list:
    val = recipe.validate
    limits = {p: Limits(val.max_drop(p), val.fp32_atol if p == "fp32" else None) for p in PRECISIONS}
    with contextlib.ExitStack() as stack:
        if backend == "ort":
            spec = graph_spec(recipe)
            io = (spec.input_names[0], spec.output_names[0])
            backends = {f"onnxruntime {p}": (p, stack.enter_context(ort_infer(bundle.path(f), *io, device=device)))
                        for p, f in graph_files.items()}
        else:
            backends = {"pytorch fp32": ("fp32", torch_infer(pruned))}
        return check_shapes(torch_infer(pruned), backends, files, recipe.scale, sizes, recipe.metric_channel,
                            limits, progress=progress, degradation=degradation)


def _latency(bundle: Bundle, recipe: Recipe, dense, pruned, dense_sha: str, vopts: ValidateOptions, runs: int,
             warmup: int, progress, device=None) -> dict:
    """Dense vs pruned on the same backend and input, interleaved, at each latency size; labelled with the
    provider (ONNX Runtime) or PyTorch and the device they ran on."""
    from sls_deploy.backends.latency import ort_call, time_side_by_side
    from sls_deploy.backends.providers import describe
    from sls_deploy.backends.sessions import release_shared_arena, timed_session
    from sls_deploy.core.device import device_name, synchronize

    sizes = list(recipe.validate.latency_sizes or [recipe.engine.profile_sizes()["opt"]])
    out: dict = {"backend": vopts.backend, "warmup": warmup, "runs": runs, "sizes": []}
    if vopts.backend == "ort":
        dense_path = dense_graph(bundle, recipe, dense, dense_sha)
        sessions = {}
        for name, path in (("dense", dense_path), ("pruned", bundle.path(ONNX))):
            sessions[name], threads = timed_session(path, vopts.threads, device)
        where = describe(sessions["pruned"], device)
        out.update(threads=threads, graphs={"dense": f"work/{DENSE_ONNX} (FP32)", "pruned": f"{ONNX} (FP32)"},
                   **where, device_name=device_name(torch.device(where["device"])),
                   note=f"ONNX Runtime ({where['provider']}) has no 2:4 sparse kernels: N:M pruning alone does "
                        "not change its speed; the 2:4 speed-up needs a TensorRT engine on the GPU")
    else:
        dev = device or torch.device("cpu")
        out.update(threads=torch.get_num_threads(), provider="pytorch", device=str(dev), device_name=device_name(dev))
    per_size_progress = progress if len(sizes) == 1 else None
    for h, w in sizes:
        x = recipe.adapter.example_input(recipe.model, h, w)
        if vopts.backend == "ort":
            feed = {graph_spec(recipe).input_names[0]: x.numpy()}
            calls = {k: ort_call(s, feed) for k, s in sessions.items()}
        else:
            x = x.to(device or "cpu")

            def torch_call(model):
                def run():
                    with torch.no_grad():
                        model(x)
                    synchronize(x.device)  # CUDA runs asynchronously: time the work, not its launch
                return run

            calls = {"dense": torch_call(dense), "pruned": torch_call(pruned)}
        t = time_side_by_side(calls, warmup, runs, progress=per_size_progress)
        out["sizes"].append({"lr_hw": [h, w], "dense": t["dense"].to_json(), "pruned": t["pruned"].to_json(),
                             "ratio_pruned_over_dense": t["pruned"].median_ms / t["dense"].median_ms})
    if vopts.backend == "ort":
        small = recipe.adapter.example_input(recipe.model, 16, 16)
        release_shared_arena(sessions.values(), {graph_spec(recipe).input_names[0]: small.numpy()})
    return out


def _merge_engine_layers(bundle: Bundle, layers: list[dict]) -> None:
    """TensorRT's per-layer eligibility and choice, when an engine was built into this bundle."""
    path = bundle.path(LAYERS_JSON)
    if not path.is_file():
        return
    try:
        data = load_json(path, "engine layer report")
        rows = {r["name"]: r for r in (data if isinstance(data, list) else data.get("layers", []))}
    except (SlsError, AttributeError, KeyError, TypeError):
        return  # not a layers.json we wrote: the columns stay out
    for l in layers:
        r = rows.get(l["name"])
        if r:
            l["trt_eligible"], l["trt_picked_sparse"] = r.get("trt_eligible"), r.get("trt_picked_sparse")


def precision_quality(onnx_path: Path, refs: dict, scale: int, channel: str, io: tuple[str, str] = ("lr", "sr"),
                      device=None) -> dict:
    """One graph on the eval images (one run each): PSNR vs ground truth, and vs the FP32 PyTorch output."""
    from sls_deploy.data.images import quantize, to_image
    from sls_deploy.data.metrics import psnr

    gt_psnr, ref_psnr, max_abs = [], [], 0.0
    with ort_infer(onnx_path, *io, device=device) as run:
        for hr, lr, ref in refs.values():
            got = np.clip(run(lr), 0, 1)
            gt_psnr.append(psnr(quantize(to_image(got)), quantize(to_image(hr)), scale, channel == "y"))
            max_abs = max(max_abs, float(np.abs(got - ref).max()))
            ref_psnr.append(psnr(got[0].transpose(1, 2, 0) * 255.0, ref[0].transpose(1, 2, 0) * 255.0))
    return {f"psnr_{channel}": float(np.mean(gt_psnr)), "psnr_vs_torch_fp32": float(np.mean(ref_psnr)),
            "max_abs_vs_torch_fp32": max_abs}
