"""Generic ONNX export and the checks every exported graph must pass.

Export knows nothing of training or of any architecture: it takes a module, the adapter's ExportSpec and an
example input. The graph's weights are then read back and checked for the N:M pattern the plan promises.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sls_deploy.core.atomic import atomic_path
from sls_deploy.core.device import model_device
from sls_deploy.core.errors import ExportError
from sls_deploy.core.onnx_files import check_graph
from sls_deploy.models.base import ExportSpec
from sls_deploy.pruning.nm.patterns import is_nm, max_nonzeros_per_group


def _dynamic_shapes(spec: ExportSpec, args) -> tuple:
    """torch.export Dims for the spec's dynamic axes (one Dim per axis name, shared across inputs)."""
    dims: dict[str, Any] = {}
    out = []
    for name, a in zip(spec.input_names, args):
        axes = {}
        for axis, label in spec.dynamic_axes.get(name, {}).items():
            dims.setdefault(label, torch.export.Dim(label.replace(" ", "_"), min=2, max=8192))
            axes[int(axis)] = dims[label]
        out.append(axes or None)
    return tuple(out)


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401  (imported only to say it is missing)
    except ImportError:
        raise ExportError("export.exporter dynamo (the default) needs onnxscript, a dependency of sls-deploy: "
                          "pip install onnxscript (or set export.exporter: torchscript)") from None


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints its progress on stdout and logs a warning per torchvision op it skips; the
    TorchScript exporter warns that it is deprecated. Keep stdout parseable (``--json``) and stderr for errors."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_onnx(model: torch.nn.Module, spec: ExportSpec, example: torch.Tensor | tuple[torch.Tensor, ...],
                path: str | os.PathLike) -> Path:
    """Write ``model`` as ONNX (dynamic axes from ``spec``), atomically, and run onnx.checker on it.

    ``model`` is the module whose forward is the graph (the adapter's ``export_module``); ``example`` its one
    input tensor or a tuple of its inputs (in ``spec.input_names`` order).
    """
    path = Path(path)
    args = tuple(a.cpu() for a in (example if isinstance(example, tuple) else (example,)))
    if model_device(model).type != "cpu":  # exported from a CPU copy: the graph does not depend on the device
        model = copy.deepcopy(model).cpu()
    model.eval()
    if spec.exporter == "dynamo":
        _require_onnxscript()
    with atomic_path(path) as tmp:
        with _quiet_exporter():
            try:
                if spec.exporter == "dynamo":  # the torch.export-based exporter (needs onnxscript)
                    # a dynamic axis traced at size 1 would be specialised to 1: trace the batch at 2
                    args = tuple(a.repeat(2, *([1] * (a.dim() - 1)))
                                 if 0 in spec.dynamic_axes.get(n, {}) and a.shape[0] == 1 else a
                                 for n, a in zip(spec.input_names, args))
                    torch.onnx.export(model, args, str(tmp), dynamo=True, opset_version=spec.opset,
                                      input_names=list(spec.input_names), output_names=list(spec.output_names),
                                      dynamic_shapes=_dynamic_shapes(spec, args), external_data=False, verbose=False)
                else:
                    torch.onnx.export(
                        model, args, str(tmp), dynamo=False, opset_version=spec.opset,
                        input_names=list(spec.input_names), output_names=list(spec.output_names),
                        dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()}, do_constant_folding=True)
            except Exception as e:
                raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from None
        if spec.exporter == "dynamo":
            graph = onnx.load(str(tmp))
            if strip_stack_traces(graph):
                onnx.save(graph, str(tmp))
        check_graph(tmp)
    return path


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # the dynamo exporter's per-node Python stack (absolute source paths)


def strip_stack_traces(model: onnx.ModelProto) -> int:
    """Remove the dynamo exporter's per-node stack traces, in subgraphs and functions too; returns how many.

    They name the exporting checkout's absolute source paths, so the same model exported from two folders gave
    different bytes, and a shipped graph told where it was built. The other node metadata (module scopes, FX node)
    names no path and stays."""
    removed = 0

    def graph_nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                subs = [attr.g] if attr.HasField("g") else []
                for g in [*subs, *attr.graphs]:
                    yield from graph_nodes(g)

    nodes = [*graph_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    for node in nodes:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(keep) != len(node.metadata_props):
            removed += len(node.metadata_props) - len(keep)
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    return removed


@dataclass(frozen=True)
class GraphWeight:
    """A weight tensor feeding a Conv/Gemm/MatMul, found by looking back through Cast/Q/DQ nodes."""

    tensor: str  # initializer name
    node: str
    op: str
    shape: tuple[int, ...]
    axis: int  # reduction axis (input channels)
    values: np.ndarray


_PASS_THROUGH = {"Cast", "QuantizeLinear", "DequantizeLinear"}


def graph_weights(model: onnx.ModelProto) -> list[GraphWeight]:
    """Every Conv/Gemm/MatMul weight initializer with its reduction axis (TensorRT's sparsity rule)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def find(name: str) -> str | None:
        seen = 0
        while name not in inits and name in producer and producer[name].op_type in _PASS_THROUGH and seen < 8:
            name, seen = producer[name].input[0], seen + 1
        return name if name in inits else None

    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            cands = [(node.input[1], 1)]
        elif node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            cands = [(node.input[1], 1 if trans_b else 0)]
        elif node.op_type == "MatMul":
            cands = [(node.input[1], 0)]
        else:
            continue
        for tname, axis in cands:
            init = find(tname)
            if init is None:
                continue
            arr = numpy_helper.to_array(inits[init])
            out.append(GraphWeight(init, node.name, node.op_type, tuple(arr.shape), axis, arr))
    return out


def reduction_last(w: GraphWeight) -> np.ndarray:
    """The weight with its reduction axis moved to position 1 (the layout the N:M checker reads)."""
    arr = w.values
    if arr.ndim == 2 and w.axis == 0:  # MatMul / Gemm without transB: (K, N) -> (N, K)
        arr = arr.T
    return arr


def weight_is_nm(w: GraphWeight, n: int, m: int) -> bool:
    arr = reduction_last(w)
    return arr.shape[1] % m == 0 and is_nm(arr, n, m)


def weight_is_2to4(w: GraphWeight) -> bool:
    return weight_is_nm(w, 2, 4)


def verify_plan_in_graph(model: onnx.ModelProto, layers: list[tuple[str, int, int]]) -> dict[str, dict]:
    """For each (layer, n, m), find ``<layer>.weight`` in the graph and check its N:M pattern.

    Returns {layer: {"nm": bool, "2to4": bool, "max_nonzeros": int}}; raises ExportError if a layer is missing.
    """
    by_name = {w.tensor: w for w in graph_weights(model)}
    result = {}
    for layer, n, m in layers:
        w = by_name.get(f"{layer}.weight")
        if w is None:
            raise ExportError(f"layer '{layer}' has no weight tensor '{layer}.weight' in the ONNX graph")
        arr = reduction_last(w)
        result[layer] = {"nm": weight_is_nm(w, n, m), "2to4": weight_is_2to4(w),
                         "max_nonzeros": max_nonzeros_per_group(arr, m)}
    return result
