"""FP16 and INT8 graphs of the video models: BasicVSR's clip graph (lr (1,T,3,H,W) -> sr) and StreamVSR's
recurrent step graph (prev_lr, lr, hidden -> sr, hidden_out), tiny random-weight models.

FP16 accuracy is measured on an emulation of the FP16 graph (every op in FP32, every FP16 tensor rounded to
FP16 by explicit Cast pairs): ONNX Runtime on CPU runs FP16 ops by casting to FP32 and drops the casts between
consecutive ops, so the graph run as is would understate the FP16 error a GPU shows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import torchscript

from sls_deploy.core.errors import ExportError
from sls_deploy.models import get_adapter
from sls_deploy.onnx.export import export_onnx, graph_weights
from sls_deploy.onnx.precision import (calibrate, calibrate_feeds, quantize_int8, quantized_inputs, to_fp16,
                                       video_calibration_feeds)

ARCHS = ("basicvsr", "streamvsr")
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
H, W = 24, 32  # LR size of the accuracy checks (export at another size: H/W are dynamic)
# Thresholds: PSNR (peak 1.0) of each output of the rewritten graph against the FP32 graph's, on these tiny
# models (whose SR is ~15-18 dB away from the bilinear upscaling: the network's part is not negligible).
# Measured (emulated FP16, default islands): clip sr 78.6 dB; step over 5 frames sr 77.6 dB, last hidden 67.0 dB
# (79/76 dB as ONNX Runtime runs it); with SpyNet, conv_hr and conv_last in FP16 too, 73.8 dB. INT8 (percentile
# 99.99 on two other clips): clip sr 47.8 dB; step sr 49.6 dB, last hidden 41.8 dB.
FP16_MIN_DB = 60.0
INT8_MIN_DB = 36.0


def built(arch: str, seed: int = 0):
    """A tiny model (8 channels, 1 block, 3-frame clips) whose SpyNet predicts a pixel or so of non-uniform flow
    (a fresh one predicts zero) and whose other convs keep the signal's scale (He init), so that the network, not
    the bilinear skip, makes most of the output: its SR is ~20 dB from the bilinear upscaling."""
    torch.manual_seed(seed)
    adapter = get_adapter(arch)
    cfg = adapter.parse_config({"arch": arch, "num_feat": 8, "num_block": 1, "clip_len": 3})
    model = adapter.build(cfg).eval()
    with torch.no_grad():
        for level in model.spynet.basic_module:
            last = level.basic_module[8]
            last.weight.normal_(0.0, 0.05)
            last.bias.copy_(torch.tensor([0.8, -0.6]))
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d) and not name.startswith("spynet."):
                torch.nn.init.kaiming_normal_(m.weight, a=0.1)
                m.bias.normal_(0.0, 0.01)
        model.conv_last.weight.mul_(0.2)
    return adapter, cfg, model


def smooth_clip(t: int, h: int = H, w: int = W, seed: int = 1) -> np.ndarray:
    """(t, 3, h, w) in [0, 1]: coarse random noise, bilinearly upsampled and shifted a little per frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g)
    big = F.interpolate(base, size=(h + 2 * t, w + 2 * t), mode="bilinear", align_corners=False)[0]
    return np.stack([big[:, k:k + h, k:k + w].numpy() for k in range(t)]).astype(np.float32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{arch: (adapter, cfg, model, FP32 graph)}, exported at 16x16 with dynamic H/W."""
    out = {}
    for arch in ARCHS:
        adapter, cfg, model = built(arch)
        path = tmp_path_factory.mktemp(arch) / "model.onnx"
        export_onnx(adapter.export_module(model), torchscript(adapter.export_spec(cfg)),
                    adapter.example_input(cfg, 16, 16), path)
        out[arch] = (adapter, cfg, model, onnx.load(str(path)))
    return out


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 graph with every op computing in FP32 and every FP16 tensor rounded to FP16 (an explicit
    Cast fp32 -> fp16 after each op, which ONNX Runtime keeps since it loses precision)."""
    g = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    for t in g.tensors().values():
        if isinstance(t, gs.Constant) and t.values.dtype == F16:
            t.values = t.values.astype(F32)
    up: dict[str, gs.Variable] = {}

    def to32(t):
        if t.name not in up:
            up[t.name] = gs.Variable(t.name + "_emu32", dtype=F32)
            g.nodes.append(gs.Node("Cast", inputs=[t], outputs=[up[t.name]], attrs={"to": onnx.TensorProto.FLOAT}))
        return up[t.name]

    for node in list(g.nodes):
        if node.op == "Cast":
            continue
        for i, x in enumerate(node.inputs):
            if isinstance(x, gs.Variable) and x.dtype is not None and np.dtype(x.dtype) == F16:
                node.inputs[i] = to32(x)
        for j, y in enumerate(list(node.outputs)):
            if y.dtype is not None and np.dtype(y.dtype) == F16:
                tmp = gs.Variable(y.name + "_emu", dtype=F32)
                node.outputs[j] = tmp
                g.nodes.append(gs.Node("Cast", inputs=[tmp], outputs=[y], attrs={"to": onnx.TensorProto.FLOAT16}))
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    g.cleanup().toposort()
    m = gs.export_onnx(g)
    m.ir_version = 8
    return m


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_clip(model: onnx.ModelProto, spec, clip: np.ndarray, num_feat: int) -> list[np.ndarray]:
    """The graph over a (T,3,H,W) clip: the clip graph once, the step graph frame by frame with its own hidden
    state fed back. Returns [sr (T,3,4H,4W)] (+ [hidden of the last step] for the step graph)."""
    sess = session(model)
    io16 = "float16" in sess.get_inputs()[0].type
    cast = (lambda a: a.astype(np.float16)) if io16 else (lambda a: a)
    if not spec.recurrent:
        return [sess.run(["sr"], {"lr": cast(clip[None])})[0][0].astype(np.float32)]
    hidden = cast(np.zeros((1, num_feat, *clip.shape[-2:]), np.float32))
    prev, out = clip[0], []
    for frame in clip:
        sr, hidden = sess.run(["sr", "hidden_out"], {"prev_lr": cast(prev[None]), "lr": cast(frame[None]),
                                                     "hidden": hidden})
        out.append(sr[0].astype(np.float32))
        prev = frame
    return [np.stack(out), hidden.astype(np.float32)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(model)
    vis = list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in vis}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    return types


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def islands_of(adapter, model):
    return adapter.default_fp32_islands(model), adapter.fp32_island_ops()


# --- adapters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_declare_spynet_and_gridsample_islands(arch):
    adapter, _, model = built(arch)
    islands = adapter.default_fp32_islands(model)
    spynet = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("spynet.")}
    assert spynet <= set(islands) and len(spynet) == 30
    assert adapter.fp32_island_ops() == ("GridSample", "ScatterND")  # ScatterND: the dynamo RSC scatter
    assert get_adapter("edsr").fp32_island_ops() == ()  # the interface's default: no op islands


# --- FP16 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_graph_structure(graphs, arch):
    adapter, cfg, model, m32 = graphs[arch]
    islands, ops = islands_of(adapter, model)
    m16 = to_fp16(m32, islands, island_ops=ops)
    onnx.checker.check_model(m16, full_check=True)
    spec = adapter.export_spec(cfg)
    assert [i.name for i in m16.graph.input] == list(spec.input_names)
    assert [o.name for o in m16.graph.output] == list(spec.output_names)
    for v in list(m16.graph.input) + list(m16.graph.output):  # I/O stays FP32 (Casts at the borders)
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name
    types = tensor_types(m16)
    grids = [n for n in m16.graph.node if n.op_type == "GridSample"]
    assert len(grids) == (16 if arch == "basicvsr" else 7)  # SpyNet's 6 levels per pass + the hidden-state warps
    for n in grids:  # the warp, its input features and its sampling grid: FP32
        assert types[n.input[0]] == types[n.input[1]] == types[n.output[0]] == onnx.TensorProto.FLOAT, n.name
    for n in m16.graph.node:  # the pixel coordinates of the grid too
        if n.op_type == "Range":
            assert types[n.output[0]] == onnx.TensorProto.FLOAT, n.name
    weights = {w.tensor: w for w in graph_weights(m16)}
    convs = [w for w in weights.values() if w.tensor.endswith(".weight")]
    assert len({w.tensor for w in convs}) == len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    for w in convs:  # every layer's weight keeps its name; islands FP32, the rest FP16
        layer = w.tensor[: -len(".weight")]
        assert w.values.dtype == (F32 if layer in islands else F16), layer
    assert weights["forward_trunk.main.2.0.conv1.weight"].values.dtype == F16
    # every Conv node (a clip graph runs each layer once per frame) computes in its layer's precision
    for n in m16.graph.node:
        if n.op_type == "Conv":
            want = onnx.TensorProto.FLOAT if n.input[1].startswith("spynet.") or n.input[1].startswith(
                ("conv_hr", "conv_last")) else onnx.TensorProto.FLOAT16
            assert types[n.input[0]] == types[n.output[0]] == want, n.name


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_graph_runs_and_stays_close(graphs, arch):
    adapter, cfg, model, m32 = graphs[arch]
    spec = adapter.export_spec(cfg)
    islands, ops = islands_of(adapter, model)
    m16 = to_fp16(m32, islands, island_ops=ops)
    clip = smooth_clip(5 if spec.recurrent else 3)
    n = cfg.options["num_feat"]
    ref = run_clip(m32, spec, clip, n)
    as_is = run_clip(m16, spec, clip, n)  # ONNX Runtime on CPU runs it
    emu = run_clip(emulate_fp16(m16), spec, clip, n)
    for a, b, e in zip(ref, as_is, emu):
        assert a.shape == b.shape == e.shape and b.dtype == np.float32
        assert psnr(b, a) >= FP16_MIN_DB and psnr(e, a) >= FP16_MIN_DB, (psnr(b, a), psnr(e, a))
    assert ref[0].shape == (len(clip), 3, 4 * H, 4 * W)
    with torch.no_grad():  # and the FP32 graph is the model
        torch_out = model(torch.from_numpy(clip[None]))[0].numpy()
    assert np.abs(ref[0] - torch_out).max() < 1e-4


def test_fp16_step_graph_recurrence_does_not_drift(graphs):
    """The FP16 step graph driven over 5 frames, its own FP16-rounded hidden state fed back: each frame's SR and
    the last hidden state stay close to the FP32 graph's, and the error does not grow along the clip."""
    adapter, cfg, model, m32 = graphs["streamvsr"]
    spec = adapter.export_spec(cfg)
    emu = emulate_fp16(to_fp16(m32, adapter.default_fp32_islands(model), island_ops=adapter.fp32_island_ops()))
    clip = smooth_clip(5, seed=3)
    (ref, ref_h), (got, got_h) = run_clip(m32, spec, clip, 8), run_clip(emu, spec, clip, 8)
    per_frame = [psnr(g, r) for g, r in zip(got, ref)]
    assert min(per_frame) >= FP16_MIN_DB, per_frame
    assert per_frame[-1] >= per_frame[1] - 6.0, per_frame  # no compounding: the last frame as good as early ones
    assert np.abs(got_h - ref_h).max() <= 5e-3 * max(1.0, np.abs(ref_h).max())  # measured 2e-3 (|h| <= 2.3)


def test_fp16_without_gridsample_island_rounds_the_grid(graphs):
    """The op island is what keeps the grid FP32: without it, BasicVSR's hidden-state warps (FP16 features from
    the trunk) take an FP16 grid, though SpyNet (an island) computes the flow in FP32."""
    adapter, cfg, model, m32 = graphs["basicvsr"]
    m16 = to_fp16(m32, adapter.default_fp32_islands(model))
    types = tensor_types(m16)
    hidden_warps = [n for n in m16.graph.node if n.op_type == "GridSample" and not n.name.startswith("/spynet")]
    assert len(hidden_warps) == 4
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in hidden_warps)


def test_fp16_step_graph_io_fp16(graphs):
    adapter, cfg, model, m32 = graphs["streamvsr"]
    m16 = to_fp16(m32, adapter.default_fp32_islands(model), io_fp16=True, island_ops=adapter.fp32_island_ops())
    for v in list(m16.graph.input) + list(m16.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16, v.name
    types = tensor_types(m16)
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT for n in m16.graph.node if n.op_type == "GridSample")
    sr, hidden = run_clip(m16, adapter.export_spec(cfg), smooth_clip(2), 8)
    assert sr.shape == (2, 3, 4 * H, 4 * W) and np.isfinite(sr).all() and hidden.shape == (1, 8, H, W)


# --- INT8 ---------------------------------------------------------------------------------------------------


def _int8(adapter, cfg, model, m32, method="percentile"):
    spec = adapter.export_spec(cfg)
    islands, ops = islands_of(adapter, model)
    q = quantized_inputs(m32, islands, island_ops=ops)
    clips = [smooth_clip(3, seed=s) for s in (10, 11)]
    feeds = video_calibration_feeds(m32, clips, spec.recurrent)
    amax = calibrate_feeds(m32, feeds, list(q.values()), method, 99.99)
    return quantize_int8(m32, amax, islands, island_ops=ops), q, islands


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_graph_structure(graphs, arch):
    adapter, cfg, model, m32 = graphs[arch]
    m8, q, islands = _int8(adapter, cfg, model, m32)
    onnx.checker.check_model(m8, full_check=True)
    prod = producers(m8)
    types = tensor_types(m8)
    convs = [n for n in m8.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(1 for n in m32.graph.node if n.op_type == "Conv")
    trunk_uses = 0
    for n in convs:
        w = n.input[1]
        layer = w[: -len(".weight")] if w.endswith(".weight") else prod[w].input[0][: -len(".weight")]
        quantized = layer not in islands
        assert (prod[n.input[0]].op_type == "DequantizeLinear") == quantized, n.name
        assert (w in prod and prod[w].op_type == "DequantizeLinear") == quantized, n.name
        trunk_uses += layer == "forward_trunk.main.2.0.conv1"
    assert trunk_uses == (3 if arch == "basicvsr" else 1)  # the clip graph runs the trunk once per frame
    assert len(set(q.values())) == sum(1 for n in convs if prod[n.input[0]].op_type == "DequantizeLinear")
    if arch == "basicvsr":
        assert {"forward_trunk.main.2.0.conv1[0]", "forward_trunk.main.2.0.conv1[2]"} <= set(q)
    else:
        assert "forward_trunk.main.2.0.conv1" in q
    for n in m8.graph.node:
        if n.op_type == "GridSample":
            assert types[n.input[0]] == types[n.input[1]] == onnx.TensorProto.FLOAT
    weights = {w.tensor: w.values.dtype for w in graph_weights(m8)}
    assert weights["forward_trunk.main.2.0.conv1.weight"] == np.int8
    assert weights["spynet.basic_module.0.basic_module.0.weight"] == F32


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_graph_runs_and_stays_close(graphs, arch):
    adapter, cfg, model, m32 = graphs[arch]
    spec = adapter.export_spec(cfg)
    m8, _, _ = _int8(adapter, cfg, model, m32)
    clip = smooth_clip(5 if spec.recurrent else 3, seed=4)  # not a calibration clip
    for a, b in zip(run_clip(m32, spec, clip, 8), run_clip(m8, spec, clip, 8)):
        assert psnr(b, a) >= INT8_MIN_DB, psnr(b, a)


# --- calibration --------------------------------------------------------------------------------------------


def test_video_calibration_feeds_clip_and_step(graphs):
    _, _, _, clip_graph = graphs["basicvsr"]
    clips = [smooth_clip(7, 16, 16), smooth_clip(3, 16, 16, seed=2)]
    feeds = video_calibration_feeds(clip_graph, clips)  # T = 3: 2 windows of the first clip, 1 of the second
    assert len(feeds) == 3 and all(set(f) == {"lr"} and f["lr"].shape == (1, 3, 3, 16, 16) for f in feeds)
    np.testing.assert_array_equal(feeds[1]["lr"][0], clips[0][3:6])
    with pytest.raises(ExportError, match="shorter than the graph's 3 frames"):
        video_calibration_feeds(clip_graph, [smooth_clip(2, 16, 16)])

    adapter, cfg, _, step_graph = graphs["streamvsr"]
    recurrent = adapter.export_spec(cfg).recurrent
    feeds = video_calibration_feeds(step_graph, clips, recurrent)
    assert len(feeds) == 10 and all(set(f) == {"prev_lr", "lr", "hidden"} for f in feeds)
    assert feeds[0]["hidden"].shape == (1, 8, 16, 16) and not feeds[0]["hidden"].any()  # zeros at the start
    np.testing.assert_array_equal(feeds[0]["prev_lr"], feeds[0]["lr"])  # prev_lr = lr at the first frame
    np.testing.assert_array_equal(feeds[3]["prev_lr"], feeds[2]["lr"])
    out = session(step_graph).run(["hidden_out"], feeds[2])[0]
    np.testing.assert_allclose(feeds[3]["hidden"], out, rtol=0, atol=1e-6)  # the graph's own state
    assert not feeds[7]["hidden"].any()  # a new clip starts from zeros again


def test_calibrate_feeds_multi_input_and_the_image_wrapper(graphs):
    adapter, cfg, model, m32 = graphs["streamvsr"]
    islands, ops = islands_of(adapter, model)
    tensors = list(quantized_inputs(m32, islands, island_ops=ops).values())
    feeds = video_calibration_feeds(m32, [smooth_clip(3, 16, 16)], adapter.export_spec(cfg).recurrent)
    amax = calibrate_feeds(m32, feeds, tensors, "max")
    assert set(amax) == set(tensors) and all(v > 0 for v in amax.values())
    with pytest.raises(ExportError, match="lacks graph input 'hidden'"):
        calibrate_feeds(m32, [{"lr": feeds[0]["lr"], "prev_lr": feeds[0]["lr"]}], tensors)
    with pytest.raises(ExportError, match="'frame' is no input of the graph"):
        calibrate_feeds(m32, [{**feeds[0], "frame": feeds[0]["lr"]}], tensors)
    # the single-input entry point is calibrate_feeds over {input: image}
    _, _, _, clip_graph = graphs["basicvsr"]
    t = list(quantized_inputs(clip_graph, [], island_ops=("GridSample",)).values())[:4]
    lrs = [smooth_clip(3, 16, 16, seed=s)[None] for s in (5, 6)]
    assert calibrate(clip_graph, "lr", lrs, t, "entropy") == calibrate_feeds(clip_graph, [{"lr": x} for x in lrs],
                                                                              t, "entropy")
