"""`sls-deploy inspect`: per-layer view of any ONNX graph (ours or not).

For every Conv / Gemm / MatMul with a constant weight: op, weight shape, weight precision (looking through
Cast and DequantizeLinear), 2:4 status along the reduction axis (TensorRT's rule), the largest N of N:4 found,
and MACs at a given input size (shapes from ONNX shape inference with the input's dynamic axes fixed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from sls_deploy.core.errors import ExportError, UsageError
from sls_deploy.onnx.export import graph_weights, reduction_last
from sls_deploy.pruning.nm.patterns import max_nonzeros_per_group

_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}


def _fix_input_shape(model: onnx.ModelProto, size: tuple[int, int] | None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.dim_value > 0:
                continue
            if i == 0:
                d.dim_value = 1
            elif size is not None and i >= len(dims) - 2:
                d.dim_value = size[i - (len(dims) - 2)]
            elif i == 1:
                d.dim_value = 3
    return onnx.shape_inference.infer_shapes(m)


def inspect_model(model: onnx.ModelProto, size: tuple[int, int] | None = None) -> list[dict]:
    shaped = _fix_input_shape(model, size)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(shaped.graph.value_info) + list(shaped.graph.output)}
    nodes = {n.name: n for n in shaped.graph.node}
    rows = []
    for w in graph_weights(model):
        node = nodes.get(w.node)
        arr = reduction_last(w)
        out_shape = shapes.get(node.output[0]) if node is not None else None
        macs = None  # output elements x reduction length (Cin/groups * kh * kw, or K of a matmul)
        if out_shape and all(v > 0 for v in out_shape):
            macs = int(np.prod(out_shape)) * int(np.prod(arr.shape[1:]))
        cin = arr.shape[1]
        rows.append({
            "layer": w.tensor[: -len(".weight")] if w.tensor.endswith(".weight") else w.tensor,
            "node": w.node, "op": w.op, "weight_shape": list(w.shape),
            "precision": _DTYPES.get(np.dtype(w.values.dtype), str(w.values.dtype)),
            "is_2to4": cin % 4 == 0 and max_nonzeros_per_group(arr, 4) <= 2,
            "max_nonzeros_per_4": max_nonzeros_per_group(arr, 4) if cin % 4 == 0 else None,
            "macs": macs})
    return rows


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must be HxW (e.g. 180x320), not '{text}'") from None
    if h < 1 or w < 1:
        raise UsageError(f"--size must be positive, not '{text}'")
    return h, w


def resolve_target(path: Path) -> Path:
    """An ONNX file, or a bundle folder (its model.onnx)."""
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    return path


def render(rows: list[dict], size: tuple[int, int] | None) -> str:
    head = f"{'layer':28s} {'op':6s} {'weight':16s} {'prec':5s} {'2:4':4s} {'N:4':4s} " + \
           (f"GMACs@{size[0]}x{size[1]}" if size else "GMACs")
    lines = [head, "-" * len(head)]
    for r in rows:
        macs = "-" if r["macs"] is None else "%.3f" % (r["macs"] / 1e9)
        nz = "-" if r["max_nonzeros_per_4"] is None else str(r["max_nonzeros_per_4"])
        lines.append(f"{r['layer'][:28]:28s} {r['op']:6s} {'x'.join(map(str, r['weight_shape'])):16s} "
                     f"{r['precision']:5s} {'yes' if r['is_2to4'] else 'no':4s} {nz:4s} {macs}")
    total = sum(r["macs"] or 0 for r in rows)
    n24 = sum(r["is_2to4"] for r in rows)
    lines.append(f"{len(rows)} weight layers, {n24} 2:4" + (f", {total / 1e9:.2f} GMACs" if size else ""))
    return "\n".join(lines)

