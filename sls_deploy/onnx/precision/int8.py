"""INT8 with explicit quantization (QuantizeLinear/DequantizeLinear), as TensorRT 10 and 11 both accept.

- Weights: per-output-channel symmetric INT8 (scale = max|w_c| / 127, zero point 0), behind a DequantizeLinear.
  A zero weight quantizes to exactly 0, so every N:M / 2:4 pattern survives.
- Activations: per-tensor symmetric scales (amax / 127) for the input of every quantized Conv, calibrated by
  running the FP32 graph in ONNX Runtime over the calibration images: ``max``, ``percentile`` (of |x|) or
  ``entropy`` (the KL-divergence threshold search TensorRT's entropy calibrator uses, over 2048 bins).
- Q/DQ go right before each Conv's activation and weight inputs, where TensorRT fuses them; FP32 islands stay
  unquantized.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.core.errors import ExportError
from sls_deploy.onnx.precision.graph import check_islands, conv_nodes_by_layer, finish, inline_constant_nodes

METHODS = ("max", "percentile", "entropy")
BINS = 2048


def quantized_inputs(model: onnx.ModelProto, islands: list[str]) -> dict[str, str]:
    """{layer: activation tensor feeding its Conv} for every Conv outside the islands."""
    graph = inline_constant_nodes(gs.import_onnx(model))
    keep = check_islands(graph, islands)
    return {name: node.inputs[0].name for name, node in conv_nodes_by_layer(graph).items() if name not in keep}


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def _entropy_amax(hist: np.ndarray, width: float) -> float:
    """TensorRT-style: the threshold whose 128-level quantization of the histogram loses the least (KL)."""
    hist = hist.astype(np.float64)
    best_i, best_kl = BINS, np.inf
    nz_total = hist.sum()
    if nz_total == 0:
        return width * BINS
    for i in range(128, BINS + 1, 8):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # clip the outliers into the last bin
        # quantize the first i bins into 128 levels, then expand back over the non-empty bins
        chunks = np.array_split(hist[:i], 128)
        q = np.concatenate([np.where(c > 0, c.sum() / max(1, np.count_nonzero(c)), 0.0) for c in chunks])
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * width


def calibrate(model: onnx.ModelProto, input_name: str, images: Sequence[np.ndarray], tensors: Sequence[str],
              method: str = "percentile", percentile: float = 99.99) -> dict[str, float]:
    """{tensor: amax} from the FP32 graph's activations over ``images`` (each 1x3xHxW float32)."""
    import onnxruntime as ort

    if method not in METHODS:
        raise ExportError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    if not 0 < percentile <= 100:
        raise ExportError(f"percentile must be in (0, 100], not {percentile}")
    tensors = list(dict.fromkeys(tensors))
    sess = ort.InferenceSession(_with_outputs(model, tensors), providers=["CPUExecutionProvider"])

    def run(img):
        return dict(zip(tensors, sess.run(tensors, {input_name: img})))

    amax = {t: 0.0 for t in tensors}
    for img in images:  # pass 1: ranges
        for t, v in run(img).items():
            amax[t] = max(amax[t], float(np.abs(v).max()))
    if method == "max":
        return amax
    hists = {t: np.zeros(BINS, np.int64) for t in tensors}
    for img in images:  # pass 2: histograms of |x| over [0, amax]
        for t, v in run(img).items():
            if amax[t] > 0:
                hists[t] += np.histogram(np.abs(v), bins=BINS, range=(0.0, amax[t]))[0]
    out = {}
    for t in tensors:
        width = amax[t] / BINS if amax[t] > 0 else 1.0 / BINS
        if method == "percentile":
            cdf = np.cumsum(hists[t]) / max(1, hists[t].sum())
            out[t] = float((np.searchsorted(cdf, percentile / 100.0) + 1) * width)
        else:
            out[t] = float(_entropy_amax(hists[t], width))
        out[t] = min(out[t], amax[t]) if amax[t] > 0 else 1.0
    return out


def quantize_int8(model: onnx.ModelProto, amax: dict[str, float], islands: list[str]) -> onnx.ModelProto:
    graph = inline_constant_nodes(gs.import_onnx(model))
    keep = check_islands(graph, islands)
    q_tensors: dict[str, gs.Variable] = {}
    for name, node in conv_nodes_by_layer(graph).items():
        if name in keep:
            continue
        x = node.inputs[0]
        if x.name not in amax:
            raise ExportError(f"no calibration scale for '{x.name}' (input of layer '{name}')")
        if x.name not in q_tensors:  # one Q/DQ pair per activation tensor, shared by its Conv consumers
            scale = gs.Constant(f"{x.name}_scale", np.array(max(amax[x.name], 1e-8) / 127.0, np.float32))
            zero = gs.Constant(f"{x.name}_zero", np.array(0, np.int8))
            xq, xdq = gs.Variable(f"{x.name}_q", np.int8), gs.Variable(f"{x.name}_dq", np.float32)
            graph.nodes += [gs.Node("QuantizeLinear", name=f"Q_{x.name}", inputs=[x, scale, zero], outputs=[xq]),
                            gs.Node("DequantizeLinear", name=f"DQ_{x.name}", inputs=[xq, scale, zero], outputs=[xdq])]
            q_tensors[x.name] = xdq
        node.inputs[0] = q_tensors[x.name]
        w = node.inputs[1]
        values = w.values.astype(np.float32)
        per_ch = np.abs(values.reshape(values.shape[0], -1)).max(1) / 127.0
        per_ch[per_ch == 0] = 1.0
        q = np.clip(np.round(values / per_ch.reshape(-1, *([1] * (values.ndim - 1)))), -127, 127).astype(np.int8)
        wq = gs.Constant(w.name, q)  # same name: the sparsity check finds the layer through the DequantizeLinear
        wdq = gs.Variable(f"{w.name}_dq", np.float32)
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"DQ_{w.name}", attrs={"axis": 0},
                                   inputs=[wq, gs.Constant(f"{w.name}_scale", per_ch.astype(np.float32)),
                                           gs.Constant(f"{w.name}_zero", np.zeros(len(per_ch), np.int8))],
                                   outputs=[wdq]))
        node.inputs[1] = wdq
    return finish(graph)


def read_calibration_images(folder: str | os.PathLike, min_size: int) -> tuple[list[np.ndarray], dict[str, str]]:
    """LR calibration inputs (1x3xHxW float32) from a folder, with each file's sha256 (for the cache key)."""
    from sls_deploy.core.atomic import sha256_file
    from sls_deploy.data.images import read_rgb
    from sls_deploy.data.sources import IMAGE_SUFFIXES
    from sls_deploy.core.errors import DataError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder {folder} holds no images")
    images, hashes = [], {}
    for f in files:
        img = read_rgb(f)
        if min(img.shape[:2]) < min_size:
            raise DataError(f"calibration image {f.name} ({img.shape[1]}x{img.shape[0]}) is smaller than the "
                            f"model's minimum input {min_size}x{min_size}")
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)[None]).astype(np.float32))
        hashes[f.name] = sha256_file(f)
    return images, hashes
