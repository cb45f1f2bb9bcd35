"""FP16 graph with FP32 islands.

Nodes are visited in topological order. A Conv named as an island runs in FP32, every other Conv in FP16; any
other node runs in FP16 unless all of its float inputs are FP32 (so elementwise pre/post-processing next to an
FP32 island stays FP32, and the residual stream is FP16). Where a tensor crosses precisions a Cast is inserted (one per tensor and target);
constants are stored in their consumer's precision. Graph inputs and outputs stay FP32 unless ``io_fp16``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.onnx.precision.graph import check_islands, conv_nodes_by_layer, finish, inline_constant_nodes

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
_ONNX = {F32: onnx.TensorProto.FLOAT, F16: onnx.TensorProto.FLOAT16}


def to_fp16(model: onnx.ModelProto, islands: list[str], io_fp16: bool = False) -> onnx.ModelProto:
    graph = inline_constant_nodes(gs.import_onnx(model))
    island_layers = check_islands(graph, islands)
    island_nodes = {id(n) for name, n in conv_nodes_by_layer(graph).items() if name in island_layers}
    graph.toposort()
    precision: dict[str, np.dtype] = {}  # tensor name -> dtype it is produced in
    casts: dict[tuple[str, np.dtype], gs.Variable] = {}
    const_copies: dict[tuple[str, np.dtype], gs.Constant] = {}

    for t in graph.inputs:
        if io_fp16 and np.dtype(t.dtype) == F32:
            t.dtype = F16
        precision[t.name] = np.dtype(t.dtype)

    def cast(t: gs.Variable, to: np.dtype) -> gs.Variable:
        key = (t.name, to)
        if key not in casts:
            out = gs.Variable(f"{t.name}_to_{to.name}", dtype=to)
            graph.nodes.append(gs.Node("Cast", name=f"Cast_{t.name}_to_{to.name}", inputs=[t], outputs=[out],
                                       attrs={"to": _ONNX[to]}))
            casts[key] = out
        return casts[key]

    for node in list(graph.nodes):
        if node.op == "Cast":
            continue
        float_inputs = [t for t in node.inputs if isinstance(t, gs.Variable) and precision.get(t.name) in (F32, F16)]
        if node.op == "Conv":
            want = F32 if id(node) in island_nodes else F16
        else:  # FP32 only where every float input is FP32 (pre/post-processing next to an island)
            want = F32 if float_inputs and all(precision[t.name] == F32 for t in float_inputs) else F16
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                if t.values.dtype in (F32, F16) and t.values.dtype != want:
                    if len(t.outputs) == 1:  # its only consumer: convert in place, keep the name (weights!)
                        t.values = t.values.astype(want)
                        continue
                    key = (t.name, want)
                    if key not in const_copies:
                        const_copies[key] = gs.Constant(f"{t.name}_{want.name}", t.values.astype(want))
                    node.inputs[i] = const_copies[key]
            elif isinstance(t, gs.Variable) and precision.get(t.name) in (F32, F16) and precision[t.name] != want:
                node.inputs[i] = cast(t, want)
        for t in node.outputs:
            if t.dtype is None or np.dtype(t.dtype) in (F32, F16):
                t.dtype = want
                precision[t.name] = want

    out_want = F16 if io_fp16 else F32
    for i, t in enumerate(list(graph.outputs)):
        if precision.get(t.name) != out_want:
            inner = gs.Variable(f"{t.name}_{precision[t.name].name}", dtype=precision[t.name])
            for node in graph.nodes:  # rename the producer's output, then Cast into the graph output name
                node.outputs = [inner if o is t else o for o in node.outputs]
                node.inputs = [inner if x is t else x for x in node.inputs]
            graph.nodes.append(gs.Node("Cast", name=f"Cast_{t.name}_out", inputs=[inner], outputs=[t],
                                       attrs={"to": _ONNX[out_want]}))
            t.dtype = out_want
    for t in graph.tensors().values():  # let shape inference re-derive intermediate shapes and types
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    return finish(graph)
