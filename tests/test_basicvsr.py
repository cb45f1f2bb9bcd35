"""BasicVSR / StreamVSR adapters: shapes, flow warping, SpyNet, BasicSR checkpoints, channel groups, ONNX."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.core.checkpoints import load_weights, read_state_dict
from sls_deploy.core.errors import CheckpointError, RecipeError
from sls_deploy.models import ChannelGroup, get_adapter
from sls_deploy.models.basicvsr import SpyNet, flow_warp
from sls_deploy.pruning.macs import layer_macs

ARCHS = ("basicvsr", "streamvsr")


def cfg_of(arch, **kw):
    return get_adapter(arch).parse_config({"arch": arch, "num_feat": 8, "num_block": 1, "clip_len": 3, **kw})


def built(arch, seed=0, **kw):
    """A tiny model whose SpyNet predicts a few pixels of non-uniform flow (a fresh one predicts zero)."""
    torch.manual_seed(seed)
    cfg = cfg_of(arch, **kw)
    model = get_adapter(arch).build(cfg).eval()
    with torch.no_grad():
        for level in model.spynet.basic_module:
            last = level.basic_module[8]
            last.weight.normal_(0.0, 0.02)
            last.bias.copy_(torch.tensor([0.05, -0.04]))
    return cfg, model


def clip(t=3, h=16, w=16, seed=1):
    return torch.rand(1, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes(arch):
    _, model = built(arch)
    with torch.no_grad():
        assert model(clip(h=32, w=32)).shape == (1, 3, 3, 128, 128)
        assert model(clip(t=2, h=16, w=21)).shape == (1, 2, 3, 64, 84)  # min_input_size, odd sizes


def test_stream_forward_equals_manual_steps():
    _, model = built("streamvsr")
    x = clip(h=20, w=28)
    with torch.no_grad():
        whole = model(x)
        hidden = model.initial_hidden(1, 20, 28)
        prev = x[:, 0]
        for i in range(3):
            sr, hidden = model.step(prev, x[:, i], hidden)
            prev = x[:, i]
            assert torch.equal(sr, whole[:, i])
    assert hidden.shape == (1, 8, 20, 28)


def test_flow_warp_zero_is_identity_and_shift_moves_pixels():
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(2, 2, 7, 9)
    assert torch.allclose(flow_warp(x, zero), x, rtol=0, atol=1e-6)
    right = torch.zeros(2, 2, 7, 9)
    right[:, 0] = 2.0  # sample 2 px to the right
    out = flow_warp(x, right)
    assert torch.allclose(out[..., :-2], x[..., 2:], rtol=0, atol=1e-5)
    assert out[..., -2:].abs().max() == 0  # zeros padding
    down = torch.zeros(2, 2, 7, 9)
    down[:, 1] = 1.0
    assert torch.allclose(flow_warp(x, down)[..., :-1, :], x[..., 1:, :], rtol=0, atol=1e-5)
    border = flow_warp(x, right, padding_mode="border")
    assert torch.allclose(border[..., -1], x[..., -1], rtol=0, atol=1e-5)


def _reference_spynet(net: SpyNet, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
    """SpyNet the way BasicSR writes it (Python-int sizes, a half-size zero flow, replicate padding,
    a channels-last warp with meshgrid), as an independent check of our trace-friendly version."""

    def warp(x, flow_nhwc, padding):
        h, w = x.shape[2:]
        gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        v = torch.stack((gx, gy), 2) + flow_nhwc
        vx = 2.0 * v[..., 0] / max(w - 1, 1) - 1.0
        vy = 2.0 * v[..., 1] / max(h - 1, 1) - 1.0
        return F.grid_sample(x, torch.stack((vx, vy), 3), mode="bilinear", padding_mode=padding, align_corners=True)

    h, w = ref.shape[2:]
    h32, w32 = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    refs = [(F.interpolate(ref, size=(h32, w32), mode="bilinear", align_corners=False) - net.mean) / net.std]
    supps = [(F.interpolate(supp, size=(h32, w32), mode="bilinear", align_corners=False) - net.mean) / net.std]
    for _ in range(5):
        refs.insert(0, F.avg_pool2d(refs[0], 2, 2))
        supps.insert(0, F.avg_pool2d(supps[0], 2, 2))
    flow = refs[0].new_zeros(ref.shape[0], 2, refs[0].shape[2] // 2, refs[0].shape[3] // 2)
    for level in range(6):
        up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
        if up.shape[2] != refs[level].shape[2]:
            up = F.pad(up, [0, 0, 0, 1], mode="replicate")
        if up.shape[3] != refs[level].shape[3]:
            up = F.pad(up, [0, 1, 0, 0], mode="replicate")
        warped = warp(supps[level], up.permute(0, 2, 3, 1), "border")
        flow = net.basic_module[level](torch.cat([refs[level], warped, up], 1)) + up
    flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([flow[:, :1] * (w / w32), flow[:, 1:] * (h / h32)], 1)


def test_spynet_matches_basicsr_formulation():
    _, model = built("basicvsr")
    x = clip(t=2, h=37, w=45)
    with torch.no_grad():
        ours = model.spynet(x[:, 0], x[:, 1])
        ref = _reference_spynet(model.spynet, x[:, 0], x[:, 1])
    assert ours.shape == (1, 2, 37, 45)
    assert ours.abs().max() > 0.5  # a real flow, not a trivial one
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)


# --- adapter: config, layers, groups, checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_parse_config_rejects_unknown_keys_and_scale(arch):
    with pytest.raises(RecipeError, match=r"model\.depth .*known: .*num_block"):
        cfg_of(arch, depth=3)
    with pytest.raises(RecipeError, match="scale must be 4"):
        cfg_of(arch, scale=2)
    with pytest.raises(RecipeError, match="not a channel group"):
        cfg_of(arch, widths={"conv_last": 2})
    with pytest.raises(RecipeError, match=r"widths\.upconv1 must be an integer in 1\.\.8"):
        cfg_of(arch, widths={"upconv1": 9})
    cfg = cfg_of(arch)
    assert cfg.scale == 4 and cfg.options["widths"] == {}
    adapter = get_adapter(arch)
    assert adapter.modalities() == (("step",) if arch == "streamvsr" else ("clip",))


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_declare_every_conv(arch):
    adapter = get_adapter(arch)
    _, model = built(arch)
    decls = {d.name: d for d in adapter.layers(model)}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(decls) == convs
    assert decls["spynet.basic_module.0.basic_module.0"].reason == "optical flow (SpyNet) stays dense"
    assert not decls["forward_trunk.main.0"].prunable and not decls["conv_last"].prunable
    prunable = {n for n, d in decls.items() if d.prunable}
    assert {"forward_trunk.main.2.0.conv1", "forward_trunk.main.2.0.conv2", "upconv1", "upconv2",
            "conv_hr"} <= prunable
    assert not any(n.startswith("spynet.") for n in prunable)
    assert ("fusion" in prunable) == (arch == "basicvsr")
    assert set(adapter.default_fp32_islands(model)) <= convs


def test_without_spynet_no_alignment():
    adapter = get_adapter("basicvsr")
    cfg = cfg_of("basicvsr", spynet=False)
    model = adapter.build(cfg).eval()
    assert model.spynet is None and not any(d.name.startswith("spynet") for d in adapter.layers(model))
    assert adapter.default_fp32_islands(model) == ["conv_hr", "conv_last"]
    with torch.no_grad():
        assert model(clip(t=2)).shape == (1, 2, 3, 64, 64)
    with pytest.raises(RecipeError, match="spynet must be true or false"):
        cfg_of("basicvsr", spynet="no")


def _check_groups(adapter, model):
    """{group: units}. An ordinary group is named after its producer; an RSC read group has no producer (its
    consumer conv1 reads a subset of the stream), a write group no consumer (conv2's outputs are added back)."""
    modules = dict(model.named_modules())
    groups = adapter.channel_groups(model)
    out = {}
    for g in groups:
        assert isinstance(g, ChannelGroup)
        if g.name.endswith(".read"):
            assert not g.producer and g.index.endswith(".read_idx") and len(g.consumers) == 1
            out[g.name] = modules[g.consumers[0]].in_channels
            continue
        if g.name.endswith(".write"):
            assert g.producer.endswith(".conv2") and not g.consumers and g.index.endswith(".write_idx")
        else:
            assert g.name == g.producer
        prod = modules[g.producer]
        assert prod.out_channels % g.unit == 0 and prod.bias.shape[0] == prod.out_channels
        for c in g.consumers:
            assert prod.out_channels == g.unit * modules[c].in_channels, (g, c)
        out[g.name] = prod.out_channels // g.unit
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_channel_groups_and_widths(arch):
    adapter = get_adapter(arch)
    _, model = built(arch, num_block=2)
    widths = _check_groups(adapter, model)
    assert widths == type(model).dense_widths(8, 2)  # group names = the widths option's keys
    assert "forward_trunk.main.0" not in widths and not any(".conv2" in k for k in widths)  # hidden stays full
    assert "forward_trunk.main.2.0.read" in widths and "forward_trunk.main.2.1.write" in widths  # RSC subsets
    small = {k: max(1, v // 2 - 1) for k, v in widths.items()}
    _, model = built(arch, num_block=2, widths=small)
    assert _check_groups(adapter, model) == small
    assert model.upconv1.weight.shape == (4 * small["upconv1"], small.get("fusion", 8), 3, 3)
    assert model.conv_last.weight.shape == (3, small["conv_hr"], 3, 3)
    assert model.forward_trunk.main[2][1].conv2.weight.shape == (small["forward_trunk.main.2.1.write"],
                                                                 small["forward_trunk.main.2.1.conv1"], 3, 3)
    assert model.forward_trunk.main[2][1].conv1.weight.shape == (small["forward_trunk.main.2.1.conv1"],
                                                                 small["forward_trunk.main.2.1.read"], 3, 3)
    with torch.no_grad():
        assert model(clip(t=2)).shape == (1, 2, 3, 64, 64)


def test_basicsr_state_dict_round_trip(tmp_path):
    adapter = get_adapter("basicvsr")
    cfg, model = built("basicvsr")
    sd = model.state_dict()
    for key in ("spynet.basic_module.0.basic_module.0.weight", "backward_trunk.main.2.0.conv1.weight",
                "upconv1.weight", "conv_hr.weight", "spynet.mean", "spynet.std"):
        assert key in sd
    path = tmp_path / "basicvsr.pth"
    torch.save({"params": {k: v for k, v in sd.items() if k not in ("spynet.mean", "spynet.std")}}, path)
    with torch.no_grad():
        ref = model(clip(t=2))
    for loaded in (read_state_dict(path), {"params_ema": sd}):
        fresh = adapter.build(cfg).eval()
        load_weights(fresh, adapter.convert_state_dict(loaded, cfg), "tiny basicvsr")
        with torch.no_grad():
            assert torch.equal(fresh(clip(t=2)), ref)


def test_checkpoint_of_other_width_is_rejected():
    adapter = get_adapter("basicvsr")
    _, wide = built("basicvsr", num_feat=12)
    cfg, model = built("basicvsr")
    with pytest.raises(CheckpointError, match="key 'backward_trunk.main.0.weight' has shape"):
        load_weights(model, adapter.convert_state_dict(wide.state_dict(), cfg), "tiny basicvsr")
    _, stream = built("streamvsr")
    with pytest.raises(CheckpointError, match="missing"):  # a streaming checkpoint has no backward trunk
        load_weights(model, adapter.convert_state_dict(stream.state_dict(), cfg), "tiny basicvsr")


def test_layer_macs_clip_and_step():
    for arch in ARCHS:
        adapter = get_adapter(arch)
        cfg, model = built(arch)
        macs = layer_macs(adapter.export_module(model), adapter.example_input(cfg, 40, 24))
        frames = 3 if arch == "basicvsr" else 1
        assert macs["conv_hr"] == frames * 40 * 24 * 16 * 64 * 64 * 9
        flows = 4 if arch == "basicvsr" else 1  # SpyNet runs on 64x32 (next multiple of 32)
        assert macs["spynet.basic_module.5.basic_module.0"] == flows * 64 * 32 * 32 * 8 * 49


def test_layer_macs_falls_back_to_cpu_without_meta_kernels():
    class NeedsData(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 1, 1)

        def forward(self, x, y):
            if x.sum().item() < 0:  # data-dependent: impossible on meta
                x = -x
            return self.conv(x + y)

    x = torch.rand(1, 3, 5, 6)
    assert layer_macs(NeedsData(), (x, x)) == {"conv": 5 * 6 * 4 * 3 * 9}


# --- ONNX --------------------------------------------------------------------------------------------------


def _export(adapter, cfg, model, path, h, w, default_exporter=False):
    """The graph in ONNX Runtime: through sls-deploy's export with the adapter's default spec (the dynamo
    exporter, opset 18), or for speed straight through the TorchScript exporter (seconds instead of a minute)."""
    spec = adapter.export_spec(cfg)
    example = adapter.example_input(cfg, h, w)
    if default_exporter:
        from sls_deploy.onnx.export import export_onnx

        assert (spec.exporter, spec.opset) == ("dynamo", 18)
        export_onnx(adapter.export_module(model), spec, example, path)
    else:
        example = example if isinstance(example, tuple) else (example,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(adapter.export_module(model), example, str(path), dynamo=False, opset_version=17,
                              input_names=list(spec.input_names), output_names=list(spec.output_names),
                              dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    inits = {t.name for t in graph.graph.initializer}
    assert {"forward_trunk.main.2.0.conv1.weight", "conv_hr.weight"} <= inits  # plan layers keep their names
    graph.ir_version = min(graph.ir_version, 8)  # in case ORT refuses a newer IR
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]), spec


def test_onnx_clip_graph_dynamic_hw_through_the_default_exporter(tmp_path):
    """The clip graph (both recurrent branches and SpyNet unrolled over T frames) through the default exporter
    (dynamo): dynamic H/W, ONNX Runtime == PyTorch."""
    adapter = get_adapter("basicvsr")
    cfg, model = built("basicvsr")
    sess, spec = _export(adapter, cfg, model, tmp_path / "basicvsr.onnx", 16, 24, default_exporter=True)
    assert spec.input_names == ("lr",) and spec.output_names == ("sr",)
    for h, w in ((20, 28), (37, 45)):
        x = clip(h=h, w=w)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"lr": x.numpy()})
        assert got.shape == (1, 3, 3, 4 * h, 4 * w)
        assert np.abs(got - ref).max() <= 1e-4


def test_onnx_step_graph_dynamic_hw(tmp_path):
    adapter = get_adapter("streamvsr")
    cfg, model = built("streamvsr")
    sess, spec = _export(adapter, cfg, model, tmp_path / "streamvsr.onnx", 16, 24)
    assert spec.input_names == ("prev_lr", "lr", "hidden") and spec.output_names == ("sr", "hidden_out")
    assert spec.recurrent == {"hidden": "hidden_out", "prev_lr": "lr"}
    for h, w in ((20, 28), (37, 45)):
        x = clip(h=h, w=w)
        with torch.no_grad():
            ref = model(x).numpy()
        feeds = {"prev_lr": x[:, 0].numpy(), "hidden": model.initial_hidden(1, h, w).numpy()}
        for i in range(3):
            feeds["lr"] = x[:, i].numpy()
            sr, hidden = sess.run(None, feeds)
            assert np.abs(sr - ref[:, i]).max() <= 1e-4
            feeds = {"prev_lr": feeds["lr"], "hidden": hidden}
        assert hidden.shape == (1, 8, h, w)
