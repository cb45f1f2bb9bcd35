"""onnx-graphsurgeon helpers shared by the FP16 and INT8 rewriters."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.core.errors import ExportError

IR_VERSION = 8  # what opset 17 needs; onnx-graphsurgeon would stamp a newer one ONNX Runtime cannot read

# Inputs of an op-type island whose producing arithmetic is part of the island too: GridSample's sampling grid
# (input 1) is computed from a flow by adds/multiplies over pixel coordinates (Range over the width, ...), and
# an FP16 grid at 1920 px moves the sample by up to 1 px (FP16 spacing at 1024..2048 is 1). Its X input (the
# features being warped) is not: only the GridSample node itself runs in FP32.
COORDINATE_INPUTS: dict[str, tuple[int, ...]] = {"GridSample": (1,)}
FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def _weight_name(node: gs.Node) -> str | None:
    if node.op == "Conv" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
            and node.inputs[1].name.endswith(".weight"):
        return node.inputs[1].name[: -len(".weight")]
    return None


def conv_nodes_by_layer(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """{layer name: its Conv nodes in graph order}, the layer name being the weight initializer's name without
    '.weight'. A layer has several nodes where the graph reuses it: a clip graph unrolls its recurrent trunk
    over the T frames, and BasicVSR runs SpyNet twice (backward and forward flows)."""
    out: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        name = _weight_name(node)
        if name is not None:
            out.setdefault(name, []).append(node)
    return out


def check_islands(graph: gs.Graph, islands: Iterable[str]) -> set[str]:
    layers = conv_nodes_by_layer(graph)
    for name in islands:
        if name not in layers:
            raise ExportError(f"FP32 island '{name}' matches no conv layer of the graph "
                              f"(layers: {', '.join(sorted(layers)[:6])}, ...)")
    return set(islands)


def op_island_nodes(graph: gs.Graph, island_ops: Iterable[str]) -> set[int]:
    """ids of the nodes an op-type island keeps at FP32: every node of those op types and, for an op with
    coordinate inputs (``COORDINATE_INPUTS``: GridSample's grid), every node on a float path into such an
    input that passes through no Conv. For BasicVSR that is the sampling grid, its pixel coordinates and the
    flow it is made of: SpyNet's coarse-to-fine accumulation of residual flows (the adds and the x2 upsampling
    between levels) and the final resize, all 2-channel tensors, back to the Conv outputs (a conv layer is an
    island only when named, see ``check_islands``). An op type absent from the graph keeps nothing."""
    ops = set(island_ops)
    out: set[int] = set()
    for node in graph.nodes:
        if node.op not in ops:
            continue
        out.add(id(node))
        stack = [node.inputs[i] for i in COORDINATE_INPUTS.get(node.op, ()) if i < len(node.inputs)]
        while stack:
            t = stack.pop()
            if not isinstance(t, gs.Variable) or not t.inputs:
                continue
            producer = t.inputs[0]
            if producer.op == "Conv" or id(producer) in out:
                continue
            out.add(id(producer))
            stack += [x for x in producer.inputs if isinstance(x, gs.Variable) and x.dtype is not None
                      and np.dtype(x.dtype) in FLOATS]
    return out


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def typed_io(node: gs.Node, opset: int) -> tuple[list[int], list[int]]:
    """Indices of the node's inputs and outputs typed by a type parameter of its schema (``T``), i.e. those
    whose element type follows the node's compute type; inputs of a fixed type (Resize's scales are always
    float32) are left out. Without a known schema, every input and output."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
    except Exception:
        return list(range(len(node.inputs))), list(range(len(node.outputs)))
    params = {c.type_param_str for c in schema.type_constraints}

    def pick(formals, n):
        out = []
        for i in range(n):
            if i < len(formals):
                f = formals[i]
            elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                f = formals[-1]
            else:
                continue
            if f.type_str in params:
                out.append(i)
        return out

    return pick(schema.inputs, len(node.inputs)), pick(schema.outputs, len(node.outputs))


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every intermediate tensor's element type inferred (the exporter records few), so that a
    rewriter tells float tensors from shape arithmetic (Shape, Gather of sizes, ...)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise ExportError(f"cannot infer the graph's tensor types: {str(e).splitlines()[0]}") from None


def finish(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"rewritten graph fails onnx checks: {str(e).splitlines()[0]}") from None
    return model


def inline_constant_nodes(graph: gs.Graph) -> gs.Graph:
    """Turn ``Constant`` nodes, and ``Identity`` nodes of a constant, into plain constants so that rewriters see
    every constant the same way. The TorchScript exporter writes an Identity for every initializer equal to an
    earlier one (zero biases, a fresh SpyNet's zero flow convs), named as the later parameter: each consumer
    then gets a constant of its own name (``<layer>.weight`` stays findable)."""
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if node.op == "Constant" and "value" in node.attrs:
            out = node.outputs[0]
            values = node.attrs["value"].values
            node.outputs.clear()
            out.to_constant(np.asarray(values))
        elif node.op == "Identity" and isinstance(node.inputs[0], gs.Constant) and id(node.outputs[0]) not in outputs:
            out = node.outputs[0]
            values = np.array(node.inputs[0].values)  # a copy: a rewriter may convert one and not the other
            node.outputs.clear()
            out.to_constant(values)
    return graph.cleanup()
