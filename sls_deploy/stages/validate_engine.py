"""`validate --backend trt`: the bundle's TensorRT engine against the FP32 graph, at every deployment shape.

Needs TensorRT (and a GPU). The reference is the FP32 ONNX graph in ONNX Runtime, so a packed bundle, which
carries no PyTorch weights, can be validated on the device. Engine and reference are both Polygraphy runners
(``TrtRunner``, ``OnnxrtRunner``) driven by ``backends.drive``, which tells the graph's kind from its spec:

- an image graph runs the image shape checks (profile min/opt/max, odd size, extra sizes, on the eval images);
- a clip graph (BasicVSR) runs the eval clips' first T frames in windows, a step graph (StreamVSR) is driven
  frame by frame with its recurrent state fed back (``ExportSpec.recurrent``), at the same labelled sizes (each
  frame centre-cropped or mirror-extended to the size), scored per frame.

``validate_packed`` is the same accuracy check with ONNX Runtime on each packed graph in place of the engine:
`validate PACK` anywhere, no TensorRT needed.

A row fails when the engine's PSNR is more than the recipe's ``validate.max_psnr_drop_db[precision]`` below the
FP32 graph's. The engine is then timed per graph run at the latency sizes, and side by side with
``engine/model.dense.plan`` when that exists (an engine built from the same graph with ``--sparsity disable``),
which gives the sparse/dense ratio.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from sls_deploy.backends import drive
from sls_deploy.backends.runners import Limits, check_clip_shapes, check_shapes
from sls_deploy.backends.runtime import onnx_runner, trt_runner
from sls_deploy.core import atomic
from sls_deploy.core.packing import VAL_DIR
from sls_deploy.stages.validate_gate import gate_failure
from sls_deploy.trt.engine import ENGINE_DIR

DENSE_ENGINE = "model.dense.plan"
DEFAULT_EVAL_FRAMES = 5  # frames per eval window of a step graph when the recipe's model has no clip_len


def _active(stack: contextlib.ExitStack, runner):
    """Activate a runner until the stack closes (a Polygraphy runner is its own context manager)."""
    if hasattr(runner, "__enter__"):
        return stack.enter_context(runner)
    runner.activate()
    stack.callback(runner.deactivate)
    return runner


def recorded_gate(root: Path) -> dict | str:
    """The quality gate `validate` recorded in the bundle's report.json (the pruned model against the dense model
    and the baseline, measured where the PyTorch weights were: a pack has none), or why there is none."""
    from sls_deploy.core.errors import SlsError
    from sls_deploy.core.safe_json import load_json

    try:
        gate = load_json(root / "report.json", "report").get("quality_gate")
    except (SlsError, AttributeError):
        return "not measured (no readable report.json: validate the bundle before packing it)"
    if not isinstance(gate, dict):
        return "not measured (report.json predates the gate)"
    try:
        gate_failure(gate)
    except (KeyError, TypeError, ValueError, AttributeError):
        return "not readable (report.json's quality_gate is malformed)"
    return gate


def validate_engine(root: Path, recipe, precision: str, eval_data: Path | None, runs: int | None = None,
                    open_engine=trt_runner) -> dict:
    """``open_engine(path) -> runner`` opens an engine file (default: TensorRT; tests pass ONNX Runtime)."""
    from sls_deploy.backends.latency import time_side_by_side
    from sls_deploy.core.errors import BundleError

    engine_file = root / ENGINE_DIR / "model.plan"
    if not engine_file.is_file():
        raise BundleError(f"{root} has no {ENGINE_DIR}/model.plan (run `sls-deploy engine {root}` first)")
    spec = recipe.adapter.export_spec(recipe.model)
    val = recipe.validate
    limit = val.max_drop(precision)
    name = f"tensorrt {precision}"
    dense_file = root / ENGINE_DIR / DENSE_ENGINE
    with contextlib.ExitStack() as stack:
        ref = _active(stack, onnx_runner(root / "model.onnx"))  # the engine's reference: ONNX Runtime on the CPU
        trt = _active(stack, open_engine(engine_file))
        rows, data, kind, frames = _graph_rows(root, recipe, ref, {name: (precision, trt)}, eval_data)
        engines = {"sparse": trt}
        if dense_file.is_file():
            engines["dense"] = _active(stack, open_engine(dense_file))
        latency = []
        for h, w in val.latency_sizes or [recipe.engine.profile_sizes()["opt"]]:
            x = recipe.adapter.example_input(recipe.model, h, w)
            feeds = {k: drive.example_feed(spec, x, drive.input_info(r)) for k, r in engines.items()}
            t = time_side_by_side({k: (lambda r=r, f=feeds[k]: r.infer(f)) for k, r in engines.items()},
                                  val.latency_warmup, runs or val.latency_runs)
            entry = {"lr_hw": [h, w], **({"frames_per_run": frames} if kind != drive.IMAGE else {}),
                     **{k: v.to_json() for k, v in t.items()}}
            if "dense" in t:
                entry["ratio_sparse_over_dense"] = t["sparse"].median_ms / t["dense"].median_ms
            latency.append(entry)
    failed = [r for r in rows if not r.passed]
    gate = recorded_gate(root)
    gate_failed = gate_failure(gate) if isinstance(gate, dict) else None
    res = {"backend": "tensorrt", "precision": precision, **data,
           "max_psnr_drop_db": limit, "shapes": [r.to_json() for r in rows], "latency": latency,
           "dense_engine": dense_file.is_file(), "quality_gate": gate, "passed": not failed and not gate_failed}
    res["verdict"] = (f"{name} at {failed[0].label} {failed[0].size[0]}x{failed[0].size[1]}: "
                      f"{'; '.join(failed[0].failures)}" if failed else gate_failed or
                      f"{name}: {len(rows)} shape checks within the {precision} limit {limit} dB"
                      + ("" if isinstance(gate, dict) else f"; quality gate {gate}"))
    atomic.write_json(root / ENGINE_DIR / "validate.json", res)
    return res


def _graph_rows(root: Path, recipe, ref, candidates: dict, eval_data: Path | None):
    """Every candidate runner ({name: (precision, runner)}) against the FP32 graph's runner ``ref`` at every
    deployment shape: on the eval images (a pack's val/) for an image graph, on the eval clips' windows or frame
    by frame for a clip or step graph. Returns (rows, what was run on, graph kind, frames per graph run)."""
    from sls_deploy.stages.validate_image import shape_sizes

    spec = recipe.adapter.export_spec(recipe.model)
    kind = drive.graph_kind(spec, drive.input_info(ref))
    limits = {p: Limits(recipe.validate.max_drop(p)) for p, _ in candidates.values()}
    if kind == drive.IMAGE:
        from sls_deploy.data import resolve_images

        files = resolve_images(eval_data or (root / VAL_DIR if (root / VAL_DIR).is_dir() else recipe.data_eval))
        rows = check_shapes(drive.image_infer(ref, spec), {n: (p, drive.image_infer(r, spec))
                                                          for n, (p, r) in candidates.items()}, files,
                            recipe.scale, shape_sizes(recipe), recipe.metric_channel, limits)
        return rows, {"eval_images": [f.name for f in files]}, kind, 1
    from sls_deploy.data.video import resolve_clips

    clips = resolve_clips(eval_data or recipe.data_eval)
    window = drive.input_info(ref)[spec.input_names[0]].fixed(1) if kind == drive.CLIP else None
    n_frames = window or int(recipe.model.options.get("clip_len", DEFAULT_EVAL_FRAMES))
    rows = check_clip_shapes(drive.clip_infer(ref, spec), {n: (p, drive.clip_infer(r, spec))
                                                          for n, (p, r) in candidates.items()},
                             clips, n_frames, recipe.scale, shape_sizes(recipe), recipe.metric_channel, limits)
    data = {"graph": kind, "eval_clips": [c.name for c in clips], "frames_per_clip": n_frames,
            "driven": ("frame by frame, recurrent inputs fed back " + str(dict(spec.recurrent))
                       if kind == drive.STEP else f"windows of {n_frames} frames")}
    return rows, data, kind, window or 1


def validate_packed(root: Path, recipe, eval_data: Path | None, device=None) -> dict:
    """`validate PACK` in ONNX Runtime: a pack carries no PyTorch weights, so every packed graph (FP32, FP16,
    INT8) runs against the packed FP32 graph, the reference `--backend trt` uses, at every deployment shape; a
    reduced-precision graph fails beyond the recipe's ``validate.max_psnr_drop_db`` for its precision. Nothing
    is written (no latency: time the engine with ``--backend trt`` on the device). ``device``: --device (ONNX
    Runtime's providers follow it, backends/providers.py; None: the CPU)."""
    from sls_deploy.core.bundle import GRAPH_FILES

    graphs = {p: f for p, f in GRAPH_FILES.items() if (root / f).is_file()}
    with contextlib.ExitStack() as stack:
        ref = _active(stack, onnx_runner(root / GRAPH_FILES["fp32"], device))
        candidates = {f"onnxruntime {p}": (p, _active(stack, onnx_runner(root / f, device)))
                      for p, f in graphs.items()}
        rows, data, _, _ = _graph_rows(root, recipe, ref, candidates, eval_data)
    failed = [r for r in rows if not r.passed]
    verdict = (f"{failed[0].backend} at {failed[0].label} {failed[0].size[0]}x{failed[0].size[1]}: "
               f"{'; '.join(failed[0].failures)}" if failed else
               f"packed graphs {', '.join(graphs)}: {len(rows)} shape checks against the FP32 graph within the "
               "recipe's limits")
    return {"backend": "onnxruntime", "packed": True, "reference": "FP32 graph (model.onnx)", **data,
            "max_psnr_drop_db": {p: recipe.validate.max_drop(p) for p in graphs},
            "shapes": [r.to_json() for r in rows], "passed": not failed, "verdict": verdict}
