"""The video build's export stage: the pruned model as plain FP32 ONNX, checked against the dense graph.

BasicVSR exports its clip graph (T = ``clip_len`` frames, dynamic H/W), StreamVSR its step graph (prev_lr, lr,
hidden -> sr, hidden_out; dynamic H/W): whatever the adapter's ``export_module`` is. Channel pruning must leave
plain narrower convs: the pruned graph has the dense graph's op types (no Gather/Slice/Scatter added), every conv
weight has the PyTorch layer's shape and none is larger than the dense one. The dense graph is written to work/
for the latency comparison. FP16/INT8 video graphs are not written (GridSample's sampling grid must stay FP32).
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import numpy as np

from sls_deploy.core import atomic
from sls_deploy.core.bundle import ONNX, PLAN, WEIGHTS, Bundle, digest
from sls_deploy.core.errors import ExportError, ValidationError
from sls_deploy.onnx.export import export_onnx, graph_weights, load_onnx
from sls_deploy.stages.pipeline import load_model
from sls_deploy.config.recipe import Recipe
from sls_deploy.pruning.channels.plan import StructuredPlan
from sls_deploy.stages.video_pipeline import VideoBuildOptions, frames_per_run, graph_spec, load_video_model


def op_types(graph) -> dict[str, int]:
    """{op type: count} of a graph's nodes, Identity left out: the exporter writes one for every initializer
    that equals another (a fresh SpyNet's zero flow convs, zero biases), so their number follows the values."""
    return dict(sorted(collections.Counter(n.op_type for n in graph.graph.node if n.op_type != "Identity").items()))


def run_export(bundle: Bundle, recipe: Recipe, opts: VideoBuildOptions) -> dict:
    """model.onnx (FP32): the clip graph (fixed T = clip_len) or the step graph, dynamic H/W; work/dense.onnx."""
    from sls_deploy.stages.validate import DENSE_ONNX, dense_graph

    bundle.verify([PLAN, WEIGHTS])
    plan = StructuredPlan.load(bundle.path(PLAN))
    base = Path(bundle.manifest()["stages"]["search"]["base_weights"])
    base_sha = atomic.sha256_file(base)
    inputs = digest({"weights": atomic.sha256_file(bundle.path(WEIGHTS)), "plan": atomic.sha256_file(bundle.path(PLAN)),
                     "opset": recipe.opset, "base": base_sha, "model": recipe.model.options})
    if bundle.stage_is_current("export", inputs):
        opts.log("  up to date")
        return bundle.manifest()["stages"]["export"].get("result", {})
    t0 = time.perf_counter()
    adapter = recipe.adapter
    model = load_video_model(recipe, bundle.path(WEIGHTS), plan.widths)
    spec = graph_spec(recipe)
    example = adapter.example_input(recipe.model, 32, 32)
    dense = load_model(recipe, base)
    dense_path = dense_graph(bundle, recipe, dense, base_sha)
    staged = bundle.work / "fp32.onnx"  # takes its final name only once every check passed
    export_onnx(adapter.export_module(model), spec, example, staged)
    try:
        pruned_g, dense_g = load_onnx(staged), load_onnx(dense_path)
        ops, dense_ops = op_types(pruned_g), op_types(dense_g)
        if ops != dense_ops:
            diff = sorted(set(ops.items()) ^ set(dense_ops.items()))
            raise ExportError(f"the pruned graph's ops differ from the dense graph's ({diff[0][0]}): pruning must "
                              "leave plain narrower convs")
        convs = _conv_shapes(pruned_g, model, dense)
        _ort_smoke(staged, adapter.example_input(recipe.model, 16, 16), spec)
        os.replace(staged, bundle.path(ONNX))
    finally:
        if staged.exists():
            staged.unlink()
    frames = frames_per_run(example)
    info = {"opset": recipe.opset, "graph": "step" if spec.recurrent else "clip", "frames_per_run": frames,
            "inputs": list(spec.input_names), "outputs": list(spec.output_names),
            "recurrent": dict(spec.recurrent), "op_types": ops, "same_op_types_as_dense": True,
            "narrower_convs": sum(c["pruned"] != c["dense"] for c in convs.values()), "convs": convs,
            "weights_mb": {"dense": round(os.path.getsize(dense_path) / 2 ** 20, 3),
                           "pruned": round(os.path.getsize(bundle.path(ONNX)) / 2 ** 20, 3)},
            "dense_graph": f"work/{DENSE_ONNX}",
            "note": "FP32 only: FP16/INT8 video graphs are not written (GridSample's sampling grid must stay FP32)"}
    bundle.record_stage("export", inputs, [ONNX], time.perf_counter() - t0, {"result": info})
    return info


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


def _ort_smoke(path: Path, example, spec) -> None:
    """ONNX Runtime on CPU must load the graph and run it once (16x16 LR)."""
    import onnxruntime as ort

    args = example if isinstance(example, tuple) else (example,)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sess.run(None, {n: a.numpy().astype(np.float32) for n, a in zip(spec.input_names, args)})
    except Exception as e:
        raise ValidationError(f"ONNX Runtime cannot run the exported graph: {str(e).splitlines()[0]}") from None
