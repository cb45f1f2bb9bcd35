"""onnx-graphsurgeon helpers shared by the FP16 and INT8 rewriters."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.core.errors import ExportError

IR_VERSION = 8  # what opset 17 needs; onnx-graphsurgeon would stamp a newer one ONNX Runtime cannot read


def conv_nodes_by_layer(graph: gs.Graph) -> dict[str, gs.Node]:
    """{layer name: Conv node}, the layer name being the weight initializer's name without '.weight'."""
    out = {}
    for node in graph.nodes:
        if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant) and node.inputs[1].name.endswith(".weight"):
            out[node.inputs[1].name[: -len(".weight")]] = node
    return out


def check_islands(graph: gs.Graph, islands: list[str]) -> set[str]:
    layers = conv_nodes_by_layer(graph)
    for name in islands:
        if name not in layers:
            raise ExportError(f"FP32 island '{name}' matches no conv layer of the graph "
                              f"(layers: {', '.join(sorted(layers)[:6])}, ...)")
    return set(islands)


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


def np_dtype(t) -> np.dtype | None:
    return None if t.dtype is None else np.dtype(t.dtype)


def inline_constant_nodes(graph: gs.Graph) -> gs.Graph:
    """Turn ``Constant`` nodes into plain constants so that rewriters see every constant the same way."""
    for node in graph.nodes:
        if node.op == "Constant" and "value" in node.attrs:
            out = node.outputs[0]
            values = node.attrs["value"].values
            node.outputs.clear()
            out.to_constant(np.asarray(values))
    return graph.cleanup()
