"""N:M masks and checks, the 2:4 check against Polygraphy's, mask keeping, MAC counting and one-shot planning."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sls_deploy.core.errors import PlanError
from sls_deploy.onnx.export import graph_weights, weight_is_2to4
from sls_deploy.models.edsr import EDSRAdapter
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.pruning.nm.masking import MaskSet
from sls_deploy.pruning.nm.patterns import VALID_M, eligible, is_2to4, is_nm, nm_mask
from sls_deploy.pruning.nm.oneshot import Candidate, check_budget, plan_oneshot
from sls_deploy.pruning.nm.plan import DenseLayer

PROPS = settings(max_examples=40, deadline=None)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch's TorchScript-exporter notice
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # inside Polygraphy
]


# --------------------------------------------------------------------------- independent numpy reference


def ref_groups(w: np.ndarray, m: int) -> np.ndarray:
    """(..., Cin // m, m) with the input-channel axis last, written independently of sls_deploy."""
    if w.ndim == 4:
        w = np.moveaxis(w, 1, -1)  # O, kh, kw, I
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def ref_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Mask of the N largest |w| in each group; ties go to the lowest position. Same layout as ``w``."""
    g = ref_groups(np.abs(w.astype(np.float64)), m)
    flat = g.reshape(-1, m)
    keep = np.zeros_like(flat, dtype=bool)
    for r, row in enumerate(flat):
        # sort by (-|w|, position): a stable sort of -|w| keeps the lowest position first among ties
        order = np.argsort(-row, kind="stable")
        keep[r, order[:n]] = True
    keep = keep.reshape(g.shape)
    if w.ndim == 4:
        o, i, kh, kw = w.shape
        return np.moveaxis(keep.reshape(o, kh, kw, i), -1, 1)
    return keep.reshape(w.shape)


def ref_max_per_run(w: np.ndarray, m: int) -> int:
    return int((ref_groups(w, m) != 0).sum(-1).max())


@st.composite
def weights_nm(draw, values: str = "continuous"):
    """(weight, n, m) for a random conv or linear weight with Cin = k * M."""
    m = draw(st.sampled_from(VALID_M))
    n = draw(st.integers(1, m))
    k = draw(st.integers(1, 3))
    cout = draw(st.integers(1, 5))
    conv = draw(st.booleans())
    shape = (cout, k * m, draw(st.integers(1, 3)), draw(st.integers(1, 3))) if conv else (cout, k * m)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if values == "continuous":  # no zeros, no ties (almost surely)
        w = rng.standard_normal(shape).astype(np.float32)
        w[w == 0] = 1.0
    else:  # few distinct values: many ties and zeros
        w = rng.integers(-3, 4, size=shape).astype(np.float32)
    return torch.from_numpy(w), n, m


# --------------------------------------------------------------------------- nm_mask / is_nm


@PROPS
@given(weights_nm())
def test_nm_mask_keeps_the_n_largest_per_group(args):
    w, n, m = args
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    per_group = ref_groups(mask.numpy(), m).sum(-1)
    assert (per_group == n).all()
    np.testing.assert_array_equal(mask.numpy(), ref_mask(w.numpy(), n, m))
    # every kept |w| is >= every dropped |w| of the same group
    g_abs = ref_groups(np.abs(w.numpy()), m)
    g_keep = ref_groups(mask.numpy(), m)
    kept_min = np.where(g_keep, g_abs, np.inf).min(-1)
    dropped_max = np.where(g_keep, -np.inf, g_abs).max(-1)
    assert (kept_min >= dropped_max).all()


@PROPS
@given(weights_nm())
def test_masked_weight_is_exactly_nm(args):
    w, n, m = args
    pruned = w * nm_mask(w, n, m)
    assert is_nm(pruned, n, m)
    assert is_nm(pruned.numpy(), n, m)  # numpy input takes the same path
    assert ref_max_per_run(pruned.numpy(), m) == n  # the weights have no zeros, so exactly N survive
    if n < m:
        assert not is_nm(pruned, n - 1, m)
        assert not is_nm(w, n, m)  # the dense weight itself is not N:M


@PROPS
@given(weights_nm(values="ties"))
def test_nm_mask_with_ties_and_zeros_matches_reference(args):
    w, n, m = args
    mask = nm_mask(w, n, m)
    assert (ref_groups(mask.numpy(), m).sum(-1) == n).all()
    np.testing.assert_array_equal(mask.numpy(), ref_mask(w.numpy(), n, m))
    assert is_nm(w * mask, n, m)


@pytest.mark.parametrize("m", VALID_M)
@pytest.mark.parametrize("value", [0.0, 1.5, -2.0])
def test_all_equal_group_keeps_the_lowest_positions(m, value):
    for n in (1, m // 2, m - 1, m):
        w = torch.full((2, 2 * m, 3, 3), value)
        mask = nm_mask(w, n, m)
        expected = torch.zeros(2 * m, dtype=torch.bool)
        expected[:n] = True
        expected[m:m + n] = True
        assert torch.equal(mask, expected.view(1, -1, 1, 1).expand_as(w))
        lin = nm_mask(torch.full((3, m), value), n, m)
        assert torch.equal(lin, expected[:m].expand(3, m))


def test_groups_run_along_input_channels_not_kernel_positions():
    # one output, 4 input channels, 1x2 kernel: the group at kernel position 0 and the one at position 1
    w = torch.tensor([[[[1.0, 4.0]], [[2.0, 3.0]], [[3.0, 2.0]], [[4.0, 1.0]]]])  # (1, 4, 1, 2)
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [True, True, False, False]
    # linear: groups are consecutive entries of each row
    lin = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_mask(lin, 1, 4).tolist() == [[False, False, False, True, True, False, False, False]]


def test_nm_mask_does_not_modify_its_input():
    w = torch.randn(4, 8, 3, 3)
    before = w.clone()
    nm_mask(w, 2, 4)
    assert torch.equal(w, before)


@pytest.mark.parametrize("n,m", [(2, 2), (1, 3), (2, 5), (4, 6), (1, 64), (0, 4), (5, 4), (-1, 8), (17, 16)])
def test_nm_mask_rejects_bad_n_m(n, m):
    with pytest.raises(ValueError):
        nm_mask(torch.randn(4, 64, 3, 3), n, m)


@pytest.mark.parametrize("shape,m", [((4, 6, 3, 3), 4), ((4, 12, 1, 1), 8), ((3, 10), 4), ((8, 3, 3, 3), 4),
                                     ((4, 16, 3, 3), 32)])
def test_nm_mask_rejects_cin_not_divisible_by_m(shape, m):
    with pytest.raises(ValueError):
        nm_mask(torch.randn(*shape), 1, m)


def test_nm_mask_rejects_other_ranks():
    with pytest.raises(ValueError):
        nm_mask(torch.randn(8), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 8, 3), 2, 4)


def test_eligible():
    assert eligible((16, 64, 3, 3), 4)
    assert eligible((16, 64, 3, 3), 32)
    assert eligible((10, 8), 8)
    assert not eligible((16, 3, 3, 3), 4)  # Cin 3
    assert not eligible((16, 12, 3, 3), 8)  # 12 % 8
    assert not eligible((16, 20), 16)
    assert not eligible((16, 64, 3, 3), 4, groups=2)
    assert not eligible((64, 1, 3, 3), 4, groups=64)  # depthwise
    assert eligible((16, 64, 3, 3), 4, groups=1)


def test_is_2to4_counts_runs_of_four_input_channels():
    w = torch.zeros(2, 8, 1, 1)
    w[:, [0, 1, 6, 7]] = 1.0
    assert is_2to4(w)
    w[0, 2] = 1.0  # three non-zeros in the first run of one output
    assert not is_2to4(w)
    assert not is_2to4(torch.zeros(2, 6, 1, 1))  # Cin not a multiple of 4
    assert is_2to4(torch.zeros(3, 8))


# --------------------------------------------------------------------------- 2:4 check vs Polygraphy


def polygraphy_sparse(model: onnx.ModelProto) -> set[str]:
    from polygraphy.tools.sparse import SparsityPruner

    p = SparsityPruner(model)
    p.check()
    return set(p.sparse_tensors)


def ours_sparse(model: onnx.ModelProto) -> set[str]:
    return {w.tensor for w in graph_weights(model) if weight_is_2to4(w)}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)  # Cin 3: never 2:4-eligible
        self.p24 = nn.Conv2d(8, 8, 3, padding=1)
        self.p14 = nn.Conv2d(8, 8, 3, padding=1)
        self.dense = nn.Conv2d(8, 8, 3, padding=1)
        self.p28 = nn.Conv2d(8, 16, 3, padding=1)
        self.p48 = nn.Conv2d(16, 16, 1)
        self.p48_split = nn.Conv2d(16, 8, 3, padding=1)  # 4:8 arranged so it is also 2:4
        self.fc24 = nn.Linear(8, 8)  # Gemm (transB=1)
        self.fc_dense = nn.Linear(8, 4)
        self.mm24 = nn.Linear(8, 8, bias=False)  # on a 3-D input: MatMul with a transposed initializer

    def forward(self, x):
        x = torch.relu(self.first(x))
        x = torch.relu(self.p24(x))
        x = torch.relu(self.p14(x))
        x = torch.relu(self.dense(x))
        x = torch.relu(self.p28(x))
        x = torch.relu(self.p48(x))
        x = self.p48_split(x)
        seq = self.mm24(x.flatten(2).transpose(1, 2))  # (B, HW, 8)
        v = self.fc24(seq.mean(1))
        return self.fc_dense(torch.relu(v))


def test_is_2to4_agrees_with_polygraphy_on_an_exported_graph(tmp_path):
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for name, n, m in [("p24", 2, 4), ("p14", 1, 4), ("p28", 2, 8), ("p48", 4, 8), ("fc24", 2, 4),
                           ("mm24", 2, 4)]:
            layer = getattr(net, name)
            layer.weight.mul_(nm_mask(layer.weight, n, m))
        # 4:8 with the 4 largest of every 8 at positions 0,1,4,5: the mask is then 2:4 as well
        w = net.p48_split.weight
        big = torch.zeros(16, dtype=torch.bool)
        big[[0, 1, 4, 5, 8, 9, 12, 13]] = True
        w.copy_(torch.where(big.view(1, -1, 1, 1), w.sign() * (w.abs() + 10), w))
        w.mul_(nm_mask(w, 4, 8))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 6, 6),), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))

    ours, theirs = ours_sparse(model), polygraphy_sparse(model)
    assert ours == theirs

    weights = {w.tensor: w for w in graph_weights(model)}
    ops = {w.op for w in weights.values()}
    assert {"Conv", "Gemm", "MatMul"} <= ops  # every weight-carrying op type was exercised
    mm_init = [w.tensor for w in weights.values() if w.op == "MatMul"]
    assert len(mm_init) == 1
    expected = {"p24.weight", "p14.weight", "p28.weight", "p48_split.weight", "fc24.weight", mm_init[0]}
    assert ours == expected
    # the plain 4:8 layer: whatever it is, it is what an independent count says (and what Polygraphy says)
    p48 = net.p48.weight.detach().numpy()
    assert ("p48.weight" in ours) == (ref_max_per_run(p48, 4) <= 2)


def _gemm_model(b: np.ndarray, trans_b: int, op: str = "Gemm") -> onnx.ModelProto:
    k = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])
    init = numpy_helper.from_array(b.astype(np.float32), name="B")
    if op == "Gemm":
        node = helper.make_node("Gemm", ["x", "B"], ["y"], name="g", transB=trans_b)
    else:
        node = helper.make_node("MatMul", ["x", "B"], ["y"], name="g")
    graph = helper.make_graph([node], "g", [x], [y], [init])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,trans_b", [("Gemm", 1), ("Gemm", 0), ("MatMul", 0)])
@pytest.mark.parametrize("along_reduction", [True, False])
def test_gemm_matmul_axes_agree_with_polygraphy(op, trans_b, along_reduction):
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float32))  # (out, in) as torch stores it
    # 2:4 along the reduction axis (in), or along the output axis (then not 2:4 where it matters)
    pruned = (w * nm_mask(w, 2, 4)) if along_reduction else (w * nm_mask(w.T, 2, 4).T)
    b = pruned.numpy() if trans_b else pruned.numpy().T
    model = _gemm_model(b, trans_b, op)
    onnx.checker.check_model(model)
    ours, theirs = ours_sparse(model), polygraphy_sparse(model)
    assert ours == theirs
    assert ours == ({"B"} if along_reduction else set())


def test_verify_plan_in_graph_on_an_exported_edsr(tmp_path):
    from sls_deploy.core.errors import ExportError
    from sls_deploy.onnx.export import export_onnx, verify_plan_in_graph

    adapter = EDSRAdapter()
    cfg = adapter.parse_config({"arch": "edsr", "scale": 2, "num_feat": 8, "num_block": 1})
    torch.manual_seed(0)
    model = adapter.build(cfg).eval()
    pruned = {"body.0.conv1": (2, 4), "body.0.conv2": (1, 8), "upsample.0": (4, 8)}
    with torch.no_grad():
        for name, (n, m) in pruned.items():
            w = model.get_submodule(name).weight
            w.mul_(nm_mask(w, n, m))
    path = export_onnx(model, adapter.export_spec(cfg), adapter.example_input(cfg, 6, 6), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    res = verify_plan_in_graph(graph, [(k, n, m) for k, (n, m) in pruned.items()] + [("conv_after_body", 2, 4)])
    assert res["body.0.conv1"] == {"nm": True, "2to4": True, "max_nonzeros": 2}
    assert res["body.0.conv2"] == {"nm": True, "2to4": True, "max_nonzeros": 1}
    w = model.upsample[0].weight.detach().numpy()
    assert res["upsample.0"] == {"nm": True, "2to4": ref_max_per_run(w, 4) <= 2, "max_nonzeros": 4}
    assert res["conv_after_body"] == {"nm": False, "2to4": False, "max_nonzeros": 4}
    assert ours_sparse(graph) == polygraphy_sparse(graph)
    with pytest.raises(ExportError, match="nope"):
        verify_plan_in_graph(graph, [("nope", 2, 4)])


# --------------------------------------------------------------------------- MaskSet


def _masked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1))
    masks = {"2": nm_mask(model[2].weight, 2, 4), "4": nm_mask(model[4].weight, 1, 8)}
    return model, masks


def _train(model, steps, maskset=None, opt_cls=torch.optim.Adam, **opt_kw):
    opt = opt_cls(model.parameters(), lr=0.5, **opt_kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(2, 3, 6, 6, generator=g)
        loss = (model(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if maskset is not None:
            maskset.apply(model)


@pytest.mark.parametrize("opt_cls,opt_kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                            (torch.optim.SGD, {"momentum": 0.9})])
def test_maskset_keeps_pruned_weights_exactly_zero(opt_cls, opt_kw):
    model, masks = _masked_model()
    before = {k: model.get_submodule(k).weight.detach().clone() for k in masks}
    ms = MaskSet(masks)
    ms.attach(model)
    for k, mask in masks.items():  # attach zeroes pruned entries at once
        assert (model.get_submodule(k).weight[~mask] == 0).all()
    _train(model, 3, ms, opt_cls, **opt_kw)
    for k, mask in masks.items():
        w = model.get_submodule(k).weight.detach()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))  # exactly 0.0
        assert not torch.equal(w[mask], before[k][mask])  # the kept weights did train
        assert is_nm(w, *(2, 4) if k == "2" else (1, 8))
    ms.detach()


def test_without_maskset_pruned_weights_do_not_stay_zero():
    """Control for the test above: training would revive the pruned entries."""
    model, masks = _masked_model()
    with torch.no_grad():
        for k, mask in masks.items():
            model.get_submodule(k).weight.mul_(mask)
    _train(model, 2)
    w = model.get_submodule("2").weight.detach()
    assert (w[~masks["2"]] != 0).any()


def test_maskset_hooks_zero_pruned_gradients_until_detached():
    model, masks = _masked_model()
    ms = MaskSet(masks)
    ms.attach(model)
    x = torch.rand(2, 3, 6, 6)
    model(x).pow(2).mean().backward()
    g = model[2].weight.grad
    assert (g[~masks["2"]] == 0).all() and (g[masks["2"]] != 0).any()
    ms.detach()
    model.zero_grad()
    model(x).pow(2).mean().backward()
    assert (model[2].weight.grad[~masks["2"]] != 0).any()


def test_maskset_rejects_wrong_shape_or_unknown_layer():
    model, masks = _masked_model()
    with pytest.raises(ValueError, match="'2'"):
        MaskSet({"2": masks["2"][:, :4]}).attach(model)
    with pytest.raises(KeyError, match="nope"):
        MaskSet({"nope": masks["2"]}).apply(model)
    with pytest.raises(KeyError):
        MaskSet({"1": masks["2"]}).apply(model)  # ReLU has no weight


# --------------------------------------------------------------------------- MACs


def _conv_out(size, k, s, p, d=1):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def test_layer_macs_match_the_hand_formula():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 12, 5, stride=2, padding=2),
        nn.Conv2d(12, 4, (3, 1), padding=0),
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.Flatten(),
    )
    h, w = 13, 10
    expected = {}
    for name, cin, cout, (kh, kw), s, (ph, pw), groups in [
        ("0", 3, 8, (3, 3), 1, (1, 1), 1), ("1", 8, 12, (5, 5), 2, (2, 2), 1), ("2", 12, 4, (3, 1), 1, (0, 0), 1),
        ("3", 4, 8, (3, 3), 1, (1, 1), 2),
    ]:
        h, w = _conv_out(h, kh, s, ph), _conv_out(w, kw, s, pw)
        expected[name] = cout * (cin // groups) * kh * kw * h * w
    flat = 8 * h * w
    model = nn.Sequential(*model, nn.Linear(flat, 5))
    expected["5"] = flat * 5
    x = torch.rand(1, 3, 13, 10)
    assert layer_macs(model, x) == expected
    assert layer_macs(model, x, names=["1", "5"]) == {"1": expected["1"], "5": expected["5"]}
    # the model itself is untouched (counting works on a meta copy)
    assert model[0].weight.device.type == "cpu"


def test_layer_macs_counts_a_reused_layer_twice():
    conv = nn.Conv2d(4, 4, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    assert layer_macs(Twice(), torch.rand(1, 4, 5, 6)) == {"conv": 2 * 4 * 4 * 9 * 5 * 6}


def test_edsr_baseline_x4_macs_at_720p():
    adapter = EDSRAdapter()
    cfg = adapter.parse_config({"arch": "edsr", "scale": 4, "num_feat": 64, "num_block": 16})
    with torch.device("meta"):
        model = adapter.build(cfg)
    macs = layer_macs(model, torch.empty(1, 3, 180, 320))
    lr, x2, hr = 180 * 320, 360 * 640, 720 * 1280
    expected = {"conv_first": 3 * 64 * 9 * lr, "conv_after_body": 64 * 64 * 9 * lr,
                "upsample.0": 64 * 256 * 9 * lr, "upsample.2": 64 * 256 * 9 * x2, "conv_last": 64 * 3 * 9 * hr}
    for i in range(16):
        expected[f"body.{i}.conv1"] = expected[f"body.{i}.conv2"] = 64 * 64 * 9 * lr
    assert macs == expected
    total = sum(macs.values())
    assert abs(total - 114.2e9) / 114.2e9 < 0.005
    assert abs(total - 114.49e9) / 114.49e9 < 0.005  # the SLS paper's figure (with minor extras)


# --------------------------------------------------------------------------- one-shot planning


def _ref_best_n(cand_macs, dense_macs, budget, m):
    total = sum(cand_macs) + sum(dense_macs)
    fixed, prunable = sum(dense_macs), sum(cand_macs)
    ok = [n for n in range(1, m + 1)
          if Fraction(fixed) + Fraction(prunable * n, m) <= Fraction(budget) * total + Fraction(total, 10**9)]
    return max(ok) if ok else None


@PROPS
@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=6), st.lists(st.integers(0, 10**9), max_size=3),
       st.integers(1, 1000), st.sampled_from(VALID_M))
def test_plan_oneshot_picks_the_largest_n_in_budget(cand_macs, dense_macs, permille, m):
    budget = permille / 1000
    cands = [Candidate(f"c{i}", "conv", (8, 4 * m, 3, 3), c) for i, c in enumerate(cand_macs)]
    dense = [DenseLayer(f"d{i}", d, "kept dense") for i, d in enumerate(dense_macs)]
    best = _ref_best_n(cand_macs, dense_macs, budget, m)
    if best is None:
        with pytest.raises(PlanError):
            plan_oneshot("t", cands, dense, budget, m, [64, 64])
        return
    plan = plan_oneshot("t", cands, dense, budget, m, [64, 64])
    assert {l.n for l in plan.layers} == {best}
    assert [l.name for l in plan.layers] == [c.name for c in cands]
    assert all(l.m == m for l in plan.layers)
    assert plan.macs_dense == sum(cand_macs) + sum(dense_macs)
    assert plan.ratio <= budget + 1e-6 + len(cands) / plan.macs_dense  # per-layer rounding only


def test_plan_oneshot_error_states_smallest_reachable_budget():
    cands = [Candidate("a", "conv", (8, 16, 3, 3), 600), Candidate("b", "conv", (8, 16, 3, 3), 200)]
    dense = [DenseLayer("first", 200, "first conv")]
    m = 8
    smallest = (200 + 800 / m) / 1000  # 0.3
    with pytest.raises(PlanError) as exc:
        plan_oneshot("t", cands, dense, smallest * 0.99, m, [64, 64])
    msg = str(exc.value)
    assert "\n" not in msg
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", msg)]
    assert any(abs(v - smallest) < 1e-4 for v in numbers), msg
    plan = plan_oneshot("t", cands, dense, smallest, m, [64, 64])  # exactly the smallest is reachable
    assert {l.n for l in plan.layers} == {1}
    plan = plan_oneshot("t", cands, dense, 1.0, m, [64, 64])
    assert {l.n for l in plan.layers} == {m}


def test_plan_oneshot_without_candidates_raises():
    with pytest.raises(PlanError):
        plan_oneshot("t", [], [DenseLayer("d", 10, "x")], 0.5, 4, [64, 64])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001, "abc", None, float("nan"), float("inf"), ""])
def test_check_budget_rejects(bad):
    with pytest.raises(PlanError):
        check_budget(bad)


@pytest.mark.parametrize("good,value", [(1, 1.0), (0.5, 0.5), ("0.25", 0.25), (1e-6, 1e-6)])
def test_check_budget_accepts(good, value):
    assert check_budget(good) == value
