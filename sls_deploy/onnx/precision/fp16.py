"""FP16 graph with FP32 islands.

Islands are conv layers named in ``islands`` (every Conv node of the layer: a clip graph runs each layer once
per frame) and op types named in ``island_ops`` (see ``graph.op_island_nodes``: for GridSample, the node and
the arithmetic that computes its sampling grid). Nodes are visited in topological order: an island runs in
FP32, every other Conv in FP16; any other node runs in FP16 unless all of its float inputs are FP32 (so
elementwise pre/post-processing next to an FP32 island or an FP32 graph input stays FP32, and the residual
stream is FP16). A node without float variable inputs (a Cast of a size, ConstantOfShape) keeps its declared
type. Only the inputs and outputs that share the node's type parameter follow its precision (Resize's scales
stay float32, as the operator requires). Where a tensor crosses precisions a Cast is inserted (one per tensor
and target); constants are stored in their consumers' precision (converted in place, keeping their name,
when all consumers want the same). Every graph input and output stays FP32 unless ``io_fp16``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.onnx.precision.graph import (FLOATS, check_islands, conv_nodes_by_layer, finish,
                                             inline_constant_nodes, op_island_nodes, opset_of, typed_io,
                                             with_types)

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
_ONNX = {F32: onnx.TensorProto.FLOAT, F16: onnx.TensorProto.FLOAT16}


def _float(t) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) in FLOATS


def to_fp16(model: onnx.ModelProto, islands: Iterable[str], io_fp16: bool = False,
            island_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """The FP32 graph ``model`` in FP16, but for the conv layers ``islands`` and the op types ``island_ops``."""
    opset = opset_of(model)
    graph = inline_constant_nodes(gs.import_onnx(with_types(model)))
    island_layers = check_islands(graph, islands)
    forced = {id(n) for name, nodes in conv_nodes_by_layer(graph).items() if name in island_layers for n in nodes}
    forced |= op_island_nodes(graph, island_ops)
    graph.toposort()
    precision: dict[str, np.dtype] = {}  # float tensor name -> dtype it is produced in
    casts: dict[tuple[str, np.dtype], gs.Variable] = {}
    const_uses: dict[int, tuple[gs.Constant, list[tuple[gs.Node, int, np.dtype]]]] = {}

    for t in graph.inputs:
        if _float(t):
            if io_fp16:
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
        ins, outs = typed_io(node, opset)
        var_in = [i for i in ins if isinstance(node.inputs[i], gs.Variable) and node.inputs[i].name in precision]
        const_in = [i for i in ins if isinstance(node.inputs[i], gs.Constant)
                    and node.inputs[i].values.dtype in FLOATS]
        typed_out = [t for i, t in enumerate(node.outputs) if i in outs and _float(t)]
        if id(node) in forced:
            want = F32
        elif node.op == "Conv":
            want = F16
        elif var_in:  # FP32 only where every float input is FP32 (pre/post-processing next to an island)
            want = F32 if all(precision[node.inputs[i].name] == F32 for i in var_in) else F16
        else:
            want = None  # no float variable input: keeps its declared type
        if want is not None:
            for i in var_in:
                if precision[node.inputs[i].name] != want:
                    node.inputs[i] = cast(node.inputs[i], want)
            for i in const_in:
                const_uses.setdefault(id(node.inputs[i]), (node.inputs[i], []))[1].append((node, i, want))
            for t in typed_out:
                t.dtype = want
            if node.op == "Cast" and typed_out:
                node.attrs["to"] = _ONNX[want]
        for t in node.outputs:
            if _float(t):
                precision[t.name] = np.dtype(t.dtype)

    _store_constants(graph, const_uses)

    out_want = F16 if io_fp16 else F32
    for t in list(graph.outputs):
        have = precision.get(t.name)
        if have is None or have == out_want:
            continue
        inner = gs.Variable(f"{t.name}_{have.name}", dtype=have)
        for node in graph.nodes:  # rename the producer's output, then Cast into the graph output name
            node.outputs = [inner if o is t else o for o in node.outputs]
            node.inputs = [inner if x is t else x for x in node.inputs]
        graph.nodes.append(gs.Node("Cast", name=f"Cast_{t.name}_out", inputs=[inner], outputs=[t],
                                   attrs={"to": _ONNX[out_want]}))
        t.dtype = out_want
    for t in graph.tensors().values():  # let shape inference re-derive intermediate shapes
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    return finish(graph)


def _store_constants(graph: gs.Graph, const_uses) -> None:
    """Each float constant in the precision its consumers want: converted in place (name kept: weights stay
    findable as ``<layer>.weight``) when every consumer wants the same, else one copy per other precision."""
    n_uses: dict[int, int] = {}
    for node in graph.nodes:
        for x in node.inputs:
            if isinstance(x, gs.Constant):
                n_uses[id(x)] = n_uses.get(id(x), 0) + 1
    for const, uses in const_uses.values():
        wanted = {w for _, _, w in uses}
        if len(wanted) == 1 and len(uses) == n_uses[id(const)]:
            (want,) = wanted
            if const.values.dtype != want:
                const.values = const.values.astype(want)
            continue
        copies: dict[np.dtype, gs.Constant] = {}
        for node, i, want in uses:
            if const.values.dtype == want:
                continue
            if want not in copies:
                copies[want] = gs.Constant(f"{const.name}_{want.name}", const.values.astype(want))
            node.inputs[i] = copies[want]
