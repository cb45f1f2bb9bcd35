"""The export stage: the finetuned model as ONNX -> model.onnx (FP32), model.fp16.onnx, model.int8.onnx.

One implementation for every strategy and modality: the adapter's ExportSpec says the graph's inputs and outputs
(an image graph, a clip graph, a recurrent step graph); the strategy says what each graph must still show
(``nm``: every planned N:M / 2:4 pattern, checked through Cast and DequantizeLinear; ``channels``: plain narrower
convs with the dense graph's op types); precision rewriting (FP32 islands the adapter or recipe declares, Q/DQ
from calibration feeds) is generic. Nothing takes a final name unless every check holds.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.bundle import GRAPH_FILES, ONNX, PLAN, WEIGHTS, Bundle, digest
from sls_deploy.core.errors import ExportError, SlsError, ValidationError
from sls_deploy.core.safe_json import load_json
from sls_deploy.modalities import registry as modalities
from sls_deploy.core.onnx_files import load_onnx
from sls_deploy.onnx.export import export_onnx, graph_weights, verify_plan_in_graph
from sls_deploy.pruning.registry import load_plan, strategy_of
from sls_deploy.stages.calibration import calibration_feeds, step_feeds
from sls_deploy.backends.loading import graph_spec, load_model, plan_widths
from sls_deploy.stages.models import check_plan_indices, fp32_islands
from sls_deploy.stages.skeleton import Run, StageOutput, run_stage

CALIB_CACHE = "calib_cache.json"
DENSE_ONNX = "dense.onnx"  # the dense base model's graph in work/ (op-type check, latency side by side)


def example_feed(recipe, spec, h: int, w: int) -> dict[str, np.ndarray]:
    """{input name: array} of the adapter's example input at LR size h x w."""
    x = recipe.adapter.example_input(recipe.model, h, w)
    args = x if isinstance(x, tuple) else (x,)
    return {n: a.numpy().astype(np.float32) for n, a in zip(spec.input_names, args)}


def dense_graph(bundle: Bundle, recipe, dense, dense_sha: str) -> Path:
    """The dense base model as FP32 ONNX in work/ (exported once per base weights)."""
    path = bundle.work / DENSE_ONNX
    stamp = bundle.work / (DENSE_ONNX + ".sha256")
    key = digest({"weights": dense_sha, "opset": recipe.opset, "exporter": recipe.exporter,
                  "model": recipe.model.options})
    if path.is_file() and stamp.is_file() and stamp.read_text() == key:
        return path
    bundle.work.mkdir(parents=True, exist_ok=True)
    export_onnx(recipe.adapter.export_module(dense), graph_spec(recipe),
                recipe.adapter.example_input(recipe.model, 32, 32), path)
    atomic.write_text(stamp, key)
    return path


def op_types(graph) -> dict[str, int]:
    """{op type: count} of a graph's nodes, Identity left out: the exporter writes one for every initializer
    that equals another (a fresh SpyNet's zero flow convs, zero biases), so their number follows the values."""
    return dict(sorted(collections.Counter(n.op_type for n in graph.graph.node if n.op_type != "Identity").items()))


def run_export(run: Run) -> dict[str, Any]:
    s, recipe, bundle = run.settings, run.recipe, run.bundle
    bundle.verify([PLAN, WEIGHTS])
    plan = load_plan(bundle.path(PLAN))
    dense_ref = strategy_of(plan).dense_reference  # channel plans: the graph is checked against the dense one
    base = bundle.recorded_file("search", "base_weights") if dense_ref else None
    feeds, hashes = [], {}
    if "int8" in s.precisions:  # read (and reject) calibration data before anything is written
        feeds, hashes = calibration_feeds(recipe, s)
    inputs = {"weights": atomic.sha256_file(bundle.path(WEIGHTS)), "plan": atomic.sha256_file(bundle.path(PLAN)),
              "opset": recipe.opset, "exporter": recipe.exporter, "model": recipe.model.options,
              "precision": {"graphs": s.precisions, "calib": hashes, "method": s.calib_method,
                            "percentile": recipe.precision.percentile, "io": s.io}}
    if base is not None:
        inputs["base"] = atomic.sha256_file(base)
    return run_stage(run, "export", inputs, lambda key: _export(run, plan, base, feeds, hashes))


def _export(run: Run, plan, base: Path | None, feeds, hashes) -> StageOutput:
    from sls_deploy.onnx.precision.fp16 import to_fp16
    from sls_deploy.onnx.precision.int8 import quantize_int8, quantized_inputs

    s, recipe, bundle = run.settings, run.recipe, run.bundle
    adapter = recipe.adapter
    model = load_model(recipe, bundle.path(WEIGHTS), plan_widths(plan))
    check_plan_indices(model, plan)
    spec = graph_spec(recipe)
    strategy = strategy_of(plan)
    islands = strategy.fp32_islands(plan)
    islands = fp32_islands(recipe, model) if islands is None else islands
    island_ops = tuple(adapter.fp32_island_ops())
    staged = bundle.work / "fp32.onnx"  # the FP32 graph takes its final name only once every check passed
    export_onnx(adapter.export_module(model), spec, adapter.example_input(recipe.model, 32, 32), staged)
    info: dict[str, Any] = {"opset": recipe.opset, "exporter": recipe.exporter, "graphs": {}, "fp32_islands": islands,
                            "fp32_island_ops": list(island_ops), "inputs": list(spec.input_names),
                            "outputs": list(spec.output_names), "recurrent": dict(spec.recurrent),
                            "frames_per_run": modalities.frames_per_run(adapter.example_input(recipe.model, 16, 16)),
                            "modality": s.modality, "graph": s.modality}
    try:
        fp32 = load_onnx(staged)
        nm = strategy.nm_part(plan)  # an N:M plan, a hybrid channel plan's 2:4 part, or None
        if strategy.dense_reference:
            info.update(_channel_checks(run, fp32, model, base, staged, plan))
        else:
            info["layers_nm"] = len(plan.layers)
        graphs = {"fp32": fp32}
        if "fp16" in s.precisions:
            graphs["fp16"] = to_fp16(fp32, islands, io_fp16=s.io == "fp16", island_ops=island_ops)
        if "int8" in s.precisions:
            q_inputs = quantized_inputs(fp32, islands, island_ops=island_ops)
            amax, reused = _calibration(bundle, fp32, spec, q_inputs, feeds, hashes, s,
                                        recipe.precision.percentile, atomic.sha256_file(staged))
            graphs["int8"] = quantize_int8(fp32, amax, islands, island_ops=island_ops)
            info["calibration"] = {"method": s.calib_method, "percentile": recipe.precision.percentile,
                                   "feeds": len(feeds), "source": s.calib if s.modality == "image" else s.data,
                                   "cache": CALIB_CACHE, "reused_cache": reused}
        smoke = example_feed(recipe, spec, 16, 16)
        for name, g in graphs.items():
            row: dict[str, Any] = {"file": GRAPH_FILES[name]}
            if nm is not None:
                row.update(_nm_checks(g, nm, name))
            _ort_smoke(g, name, smoke)
            info["graphs"][name] = row
        for name, g in graphs.items():
            if name != "fp32":
                atomic.write_bytes(bundle.path(GRAPH_FILES[name]), g.SerializeToString())
        os.replace(staged, bundle.path(ONNX))
    finally:
        if staged.exists():
            staged.unlink()
    if nm is not None:
        info.update(layers_nm=info["graphs"]["fp32"]["layers_nm"], layers_2to4=info["graphs"]["fp32"]["layers_2to4"])
    files = [GRAPH_FILES[g] for g in graphs] + ([CALIB_CACHE] if "int8" in graphs else [])
    return StageOutput(files, result=info)


def _nm_checks(graph, plan, name: str) -> dict[str, int]:
    """Every planned N:M pattern, and every planned 2:4 layer, survives in the graph."""
    checks = verify_plan_in_graph(graph, [(l.name, l.n, l.m) for l in plan.layers])
    bad = [k for k, c in checks.items() if not c["nm"]]
    if bad:
        raise ValidationError(f"layer '{bad[0]}' lost its {plan.layer(bad[0]).n}:{plan.m} pattern in the "
                              f"{name} graph")
    lost = [l.name for l in plan.layers if l.sparse_2to4 and not checks[l.name]["2to4"]]
    if lost:
        raise ValidationError(f"layer '{lost[0]}' is planned 2:4 but is not 2:4 in the {name} graph")
    return {"layers_nm": len(checks), "layers_2to4": sum(c["2to4"] for c in checks.values())}


# index_add lowers to ScatterElements (TorchScript exporter) or to Transpose + ScatterND + Transpose (dynamo)
SCATTER_OPS = ("ScatterElements", "ScatterND")
RSC_OPS = {"Gather", *SCATTER_OPS, "Transpose", "Shape", "Slice", "Expand", "ConstantOfShape", "Constant"}


def _channel_checks(run: Run, pruned_g, model, base: Path, staged: Path, plan) -> dict[str, Any]:
    """The pruned graph has the dense graph's op types and plain narrower convs (no Gather/Scatter added), except
    for Residual Sparsity Connections: one Gather per narrowed read group and one scatter (index add:
    ScatterElements, or ScatterND from the dynamo exporter) per narrowed write group, with their shape plumbing
    (``RSC_OPS``)."""
    recipe, bundle = run.recipe, run.bundle
    dense = load_model(recipe, base)
    dense_path = dense_graph(bundle, recipe, dense, atomic.sha256_file(base))
    dense_g = load_onnx(dense_path)
    ops, dense_ops = op_types(pruned_g), op_types(dense_g)
    narrowed = [g for g in plan.groups if g.index and g.kept_units < g.dense_units]
    reads = sum(not g.producers for g in narrowed)
    if narrowed:
        extra = {k: ops.get(k, 0) - dense_ops.get(k, 0) for k in set(ops) | set(dense_ops)}
        wrong = sorted(k for k, v in extra.items() if v and k not in RSC_OPS | {"Add"})
        if wrong:
            raise ExportError(f"the pruned graph adds '{wrong[0]}' ops beyond the RSC gathers/scatters")
        # a block runs once per frame in an unrolled clip graph: the same number of calls k for every block
        gathers, writes = extra.get("Gather", 0), len(narrowed) - reads
        scatters = sum(extra.get(k, 0) for k in SCATTER_OPS)
        calls = gathers // reads if reads else scatters // max(writes, 1)
        if calls < 1 or gathers != calls * reads or scatters != calls * writes:
            raise ExportError(f"the pruned graph has {gathers} more Gather and {scatters} more scatter ops "
                              f"than the dense one; the plan narrows {reads} read and {writes} write groups")
    elif ops != dense_ops:
        diff = sorted(set(ops.items()) ^ set(dense_ops.items()))
        raise ExportError(f"the pruned graph's ops differ from the dense graph's ({diff[0][0]}): pruning must "
                          "leave plain narrower convs")
    convs = _conv_shapes(pruned_g, model, dense)
    return {"op_types": ops, "same_op_types_as_dense": ops == dense_ops,
            "rsc": {"gathers": reads, "scatters": len(narrowed) - reads},
            "narrower_convs": sum(c["pruned"] != c["dense"] for c in convs.values()), "convs": convs,
            "weights_mb": {"dense": round(os.path.getsize(dense_path) / 2 ** 20, 3),
                           "pruned": round(os.path.getsize(staged) / 2 ** 20, 3)},
            "dense_graph": f"work/{DENSE_ONNX}"}


def _conv_shapes(graph, model, dense) -> dict[str, dict[str, list[int]]]:
    """Every Conv weight initializer of the pruned graph: its shape equals the PyTorch layer's and is no larger
    than the dense model's (plain narrower tensors, read back from the graph)."""
    params, dense_params = dict(model.named_parameters()), dict(dense.named_parameters())
    out = {}
    for w in graph_weights(graph):
        if w.op != "Conv":
            continue
        want, d = params.get(w.tensor), dense_params.get(w.tensor)
        if want is None or d is None:
            raise ExportError(f"conv weight '{w.tensor}' of the graph is not a parameter of the model")
        if tuple(want.shape) != w.shape:
            raise ExportError(f"conv weight '{w.tensor}' is {w.shape} in the graph, {tuple(want.shape)} in the model")
        if len(d.shape) != len(w.shape) or any(a > b for a, b in zip(w.shape, d.shape)):
            raise ExportError(f"conv weight '{w.tensor}' of the pruned graph is larger than the dense {tuple(d.shape)}")
        out[w.tensor.removesuffix(".weight")] = {"dense": list(d.shape), "pruned": list(w.shape)}
    return out


def _calibration(bundle: Bundle, fp32_model, spec, inputs: dict[str, str], feeds, hashes, s, percentile: float,
                 fp32_sha: str) -> tuple[dict[str, float], bool]:
    """Activation ranges, from the bundle's cache when the same data, method and graph made it."""
    from sls_deploy.onnx.precision.int8 import calibrate_feeds

    key = {"method": s.calib_method, "percentile": percentile, "images": hashes, "fp32_graph": fp32_sha}
    cache = bundle.path(CALIB_CACHE)
    if cache.is_file():
        try:
            old = load_json(cache, "calibration cache")
            if old.get("key") == key and set(inputs.values()) <= set(old.get("amax", {})):
                return old["amax"], True
        except (SlsError, AttributeError, TypeError):  # not a cache we wrote: calibrated again, and replaced
            pass
    feeds = step_feeds(fp32_model, spec, feeds)
    amax = calibrate_feeds(fp32_model, feeds, list(inputs.values()), s.calib_method, percentile)
    atomic.write_json(cache, {"key": key, "amax": amax,
                              "note": "per-tensor |x| ranges for INT8 (scale = amax / 127), by sls-deploy export"})
    return amax, False


def _ort_smoke(model, name: str, feed: dict[str, np.ndarray]) -> None:
    """ONNX Runtime on CPU must load and run the graph (16x16 LR)."""
    from sls_deploy.backends.sessions import cpu_session

    try:
        sess = cpu_session(model.SerializeToString())  # the CPU provider: the check is the same on every machine
        types = {i.name: np.float16 if "float16" in i.type else np.float32 for i in sess.get_inputs()}
        sess.run(None, {k: v.astype(types[k]) for k, v in feed.items() if k in types})
    except Exception as e:
        raise ValidationError(f"ONNX Runtime cannot run the {name} graph: {str(e).splitlines()[0]}") from None
