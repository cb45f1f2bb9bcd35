"""Aligned channel pruning of EDSR: its channel groups (block inner channels, pixel-shuffle units, the residual
stream with several producers), zero-then-slice equality, refusal of misaligned stream producers, exact MACs,
width selection under a budget, the sliced ONNX graph, learned per-producer scales and the SSA term."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sls_deploy.core.errors import PlanError, RecipeError
from sls_deploy.models import ChannelGroup, get_adapter
from sls_deploy.models.base import ModelConfig
from sls_deploy.pruning.channels.plan import GroupPlan, LayerCost, StructuredPlan
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import check_groups, widths_of
from sls_deploy.pruning.channels.importance import l1_importance
from sls_deploy.pruning.channels.scales import ChannelScales
from sls_deploy.pruning.channels.selection import select_global, select_uniform
from sls_deploy.pruning.channels.slicing import slice_into, zero_units
from sls_deploy.pruning.macs import layer_macs

ADAPTER = get_adapter("edsr")
X = torch.rand(1, 3, 10, 9, generator=torch.Generator().manual_seed(3))


def cfg_of(scale: int = 2, widths: dict | None = None, **kw) -> ModelConfig:
    section = {"arch": "edsr", "scale": scale, "num_feat": 8, "num_block": 2, "res_scale": 0.5, **kw}
    if widths:
        section["widths"] = widths
    return ADAPTER.parse_config(section)


def dense(scale: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = ADAPTER.build(cfg_of(scale, **kw)).eval()
    with torch.no_grad():  # non-trivial biases everywhere, so a forgotten bias row shows
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    return model


def groups_by_name(model) -> dict[str, ChannelGroup]:
    return {g.name: g for g in ADAPTER.channel_groups(model)}


def sliced_equal(model, scale, keep: dict, **kw):
    groups = ADAPTER.channel_groups(model)
    small = ADAPTER.build(cfg_of(scale, widths=widths_of(keep), **kw)).eval()
    slice_into(model, small, groups, keep)
    return small


def drop_every_third(units: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.tensor([i for i in range(units) if i % 3 != 1])
    drop = torch.tensor([i for i in range(units) if i % 3 == 1])
    return keep, drop


# --------------------------------------------------------------------------- the groups


@pytest.mark.parametrize("scale, ups", [(2, {"upsample.0": 4}), (3, {"upsample.0": 9}),
                                        (4, {"upsample.0": 4, "upsample.2": 4})])
def test_groups_declared(scale, ups):
    model = dense(scale)
    gs = groups_by_name(model)
    assert set(gs) == {"stream", "body.0.conv1", "body.1.conv1", *ups}
    assert check_groups(model, list(gs.values())) == {name: 8 for name in gs}
    assert set(gs) == set(type(model).dense_widths(scale, 8, 2))
    s = gs["stream"]
    assert s.producers == ("conv_first", "body.0.conv2", "body.1.conv2", "conv_after_body")
    assert s.producer == "conv_first" and s.multi
    assert s.consumers == ("body.0.conv1", "body.1.conv1", "conv_after_body", "upsample.0")
    assert gs["body.1.conv1"].consumers == ("body.1.conv2",) and gs["body.1.conv1"].producers == ("body.1.conv1",)
    names = list(ups)
    for i, name in enumerate(names):
        assert gs[name].unit == ups[name]
        assert gs[name].consumers == ((names[i + 1],) if i + 1 < len(names) else ("conv_last",))


def test_channel_group_api():
    g = ChannelGroup("a", "conv_a", ("conv_b",))
    assert g.producers == ("conv_a",) and not g.multi
    g = ChannelGroup("s", "", ["c"], 1, ("p", "q"))
    assert g.producer == "p" and g.consumers == ("c",)
    with pytest.raises(ValueError, match="not the first"):
        ChannelGroup("s", "q", ("c",), 1, ("p", "q"))


def test_widths_option_builds_narrower_model():
    w = {"stream": 5, "body.0.conv1": 3, "upsample.0": 2, "upsample.2": 6}
    cfg = cfg_of(4, widths=w)
    model = ADAPTER.build(cfg)
    assert model.conv_first.weight.shape == (5, 3, 3, 3)
    assert model.body[0].conv1.weight.shape == (3, 5, 3, 3) and model.body[0].conv2.weight.shape == (5, 3, 3, 3)
    assert model.body[1].conv1.weight.shape == (8, 5, 3, 3)
    assert model.conv_after_body.weight.shape == (5, 5, 3, 3)
    assert model.upsample[0].weight.shape == (8, 5, 3, 3) and model.upsample[2].weight.shape == (24, 2, 3, 3)
    assert model.conv_last.weight.shape == (3, 6, 3, 3)
    assert check_groups(model, ADAPTER.channel_groups(model)) == {**model.dense_widths(4, 8, 2), **w}
    assert model(X).shape == (1, 3, 40, 36)
    assert "widths" not in cfg_of(4).options  # dense configs are unchanged
    with pytest.raises(RecipeError, match="not a channel group of edsr"):
        cfg_of(2, widths={"upsample.2": 3})
    with pytest.raises(RecipeError, match=r"model.widths.stream must be an integer in 1..8"):
        cfg_of(2, widths={"stream": 9})


# --------------------------------------------------------------------------- zeroing == slicing


@pytest.mark.parametrize("scale, group", [(2, "body.0.conv1"), (2, "body.1.conv1"), (2, "upsample.0"),
                                          (3, "upsample.0"), (4, "upsample.0"), (4, "upsample.2"),
                                          (2, "stream"), (3, "stream"), (4, "stream")])
def test_zeroed_units_sliced_away_give_the_same_output(scale, group):
    model = dense(scale)
    g = groups_by_name(model)[group]
    keep, drop = drop_every_third(8)
    with torch.no_grad():
        before = model(X)
    zero_units(model, g, drop)
    small = sliced_equal(model, scale, {group: keep})
    with torch.no_grad():
        want, got = model(X), small(X)
    assert got.shape == want.shape == (1, 3, 10 * scale, 9 * scale)
    assert (got - want).abs().max() <= 1e-5
    assert (before - want).abs().max() > 1e-4  # the zeroed units mattered
    mods = dict(small.named_modules())
    for p in g.producers:
        assert mods[p].out_channels == g.unit * len(keep)
    for c in g.consumers:
        assert mods[c].in_channels == len(keep)


def test_all_groups_at_once_and_stream_given_per_producer():
    """Every group narrowed together; the stream's kept units given per producer (all the same)."""
    model = dense(4)
    gs = groups_by_name(model)
    keeps = {name: drop_every_third(8) for name in gs}
    for name, (_, drop) in keeps.items():
        zero_units(model, gs[name], drop)
    keep = {name: k for name, (k, _) in keeps.items()}
    keep["stream"] = {p: keep["stream"].tolist() for p in gs["stream"].producers}
    small = sliced_equal(model, 4, keep)
    with torch.no_grad():
        assert (small(X) - model(X)).abs().max() <= 1e-5
    assert small.conv_after_body.weight.shape == (5, 5, 3, 3)  # sliced on both axes


def test_misaligned_stream_producers_are_refused():
    model = dense(2)
    gs = groups_by_name(model)
    groups = list(gs.values())
    small = ADAPTER.build(cfg_of(2, widths={"stream": 4})).eval()
    keep = {p: [0, 1, 2, 3] for p in gs["stream"].producers}
    keep["body.1.conv2"] = [0, 1, 2, 4]
    with pytest.raises(PlanError, match="keep different unit indices") as e:
        slice_into(model, small, groups, {"stream": keep})
    assert "\n" not in str(e.value) and "'conv_first' and 'body.1.conv2'" in str(e.value)
    keep["body.1.conv2"] = [0, 1, 2]
    with pytest.raises(PlanError, match="different widths"):
        widths_of({"stream": keep})
    with pytest.raises(PlanError, match="keep different unit widths"):
        zero_units(model, gs["stream"], keep)
    del keep["body.1.conv2"]
    with pytest.raises(PlanError, match="no kept units given for producer 'body.1.conv2'"):
        slice_into(model, small, groups, {"stream": keep})


def _plan(groups: list[GroupPlan], layers: list[LayerCost] | None = None) -> dict:
    return StructuredPlan(model="t", method="l1", budget=0.5, round_to=1, reference_output=[8, 8], frames=1,
                          groups=groups, layers=layers or [LayerCost("other", 10, 10)]).to_json()


def test_plan_records_producers_and_refuses_disagreement():
    prods = ["conv_first", "body.0.conv2", "conv_after_body"]
    stream = GroupPlan("stream", "conv_first", ["body.0.conv1", "conv_after_body", "upsample.0"], 1, 8, [0, 2, 5],
                       prods)
    layers = [LayerCost("conv_after_body", 100, 14, "stream", "stream"), LayerCost("conv_first", 10, 4, "stream")]
    d = _plan([stream], layers)
    assert d["groups"][0]["producers"] == prods and "producer_kept" not in d["groups"][0]
    back = StructuredPlan.from_json(d)
    assert back.groups[0].producers == prods and back.widths == {"stream": 3}
    # a one-producer group written before producers existed still loads
    old = _plan([GroupPlan("a", "conv_a", ["conv_b"], 1, 4, [1])])
    del old["groups"][0]["producers"]
    assert StructuredPlan.from_json(old).groups[0].producers == ["conv_a"]

    bad = copy.deepcopy(d)
    bad["groups"][0]["producer_kept"] = {"conv_first": [0, 2, 5], "body.0.conv2": [0, 2, 6],
                                         "conv_after_body": [0, 2, 5]}
    with pytest.raises(PlanError, match="producer 'body.0.conv2' keeps different unit indices") as e:
        StructuredPlan.from_json(bad)
    assert "\n" not in str(e.value)
    bad["groups"][0]["producer_kept"]["body.0.conv2"] = [0, 2]
    with pytest.raises(PlanError, match="different unit width"):
        StructuredPlan.from_json(bad)
    # the stream split into two groups with their own kept units
    split = _plan([GroupPlan("s1", "conv_first", ["body.0.conv1"], 1, 8, [0, 1]),
                   GroupPlan("s2", "body.0.conv2", ["body.0.conv1"], 1, 8, [0, 2])])
    with pytest.raises(PlanError, match="reads two groups"):
        StructuredPlan.from_json(split)
    twice = _plan([GroupPlan("s1", "conv_first", ["a"], 1, 8, [0, 1], ["conv_first", "x"]),
                   GroupPlan("s2", "x", ["b"], 1, 8, [0, 2])])
    with pytest.raises(PlanError, match="layer 'x' is a producer of two groups"):
        StructuredPlan.from_json(twice)
    wrong_layer = copy.deepcopy(d)
    wrong_layer["layers"][1]["out_group"] = None
    with pytest.raises(PlanError, match="'conv_first' has out_group None"):
        StructuredPlan.from_json(wrong_layer)


# --------------------------------------------------------------------------- MACs and selection


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_macs_exact_for_the_sliced_model(scale):
    model = dense(scale)
    groups = ADAPTER.channel_groups(model)
    costs = GroupCosts.measure(model, groups, X)
    assert costs.dense == sum(layer_macs(model, X).values())
    widths = {"stream": 5, "body.0.conv1": 3, "upsample.0": 6}
    small = ADAPTER.build(cfg_of(scale, widths=widths))
    assert costs.per_layer(widths) == layer_macs(small, X)
    # conv_after_body reads and writes the stream: its MACs fall with the square
    assert costs.per_layer(widths)["conv_after_body"] * 64 == costs.macs["conv_after_body"] * 25


@pytest.mark.parametrize("method", ["l1", "l1-global"])
def test_selection_under_budget_narrows_the_stream(method):
    model = dense(4, num_feat=16)
    groups = ADAPTER.channel_groups(model)
    costs = GroupCosts.measure(model, groups, X)
    imp = {g.name: l1_importance(model, g) for g in groups}
    assert imp["stream"].shape == (16,)
    select = select_uniform if method == "l1" else select_global
    keep = select(imp, costs, 0.5, round_to=2)
    widths = widths_of(keep)
    assert costs.ratio(widths) <= 0.5
    assert widths["stream"] < 16
    small = sliced_equal(model, 4, keep, num_feat=16)
    assert sum(layer_macs(small, X).values()) == costs.total(widths)
    assert small.conv_first.out_channels == small.upsample[0].in_channels == widths["stream"]


def test_stream_l1_importance_is_the_mean_over_producers():
    model = dense(2)
    g = groups_by_name(model)["stream"]
    per = [model.get_submodule(p).weight.detach().abs().flatten(1).mean(1) for p in g.producers]
    assert torch.allclose(l1_importance(model, g), torch.stack(per).mean(0))
    raw = [model.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in g.producers]
    assert torch.allclose(l1_importance(model, g, normalize=False), torch.stack(raw).sum(0))


# --------------------------------------------------------------------------- ONNX


def test_sliced_onnx_has_plain_narrow_convs(tmp_path):
    model = dense(4)
    keep = {"stream": torch.tensor([0, 2, 3, 6, 7]), "body.0.conv1": torch.tensor([1, 4, 5]),
            "upsample.0": torch.tensor([0, 1, 5, 7]), "upsample.2": torch.tensor([2, 3, 4, 5, 6, 7])}
    small = sliced_equal(model, 4, keep)
    cfg = cfg_of(4, widths=widths_of(keep))
    spec = ADAPTER.export_spec(cfg)
    path = tmp_path / "edsr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ADAPTER.export_module(small), (ADAPTER.example_input(cfg, 12, 12),), str(path),
                          dynamo=False, opset_version=spec.opset, input_names=list(spec.input_names),
                          output_names=list(spec.output_names),
                          dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Gather", "GatherElements", "GatherND", "Scatter", "ScatterElements", "ScatterND"}, ops
    inits = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    assert inits["conv_first.weight"] == (5, 3, 3, 3) and inits["conv_after_body.weight"] == (5, 5, 3, 3)
    assert inits["body.0.conv1.weight"] == (3, 5, 3, 3) and inits["body.0.conv2.weight"] == (5, 3, 3, 3)
    assert inits["upsample.0.weight"] == (16, 5, 3, 3) and inits["upsample.2.weight"] == (24, 4, 3, 3)
    assert inits["conv_last.weight"] == (3, 6, 3, 3)
    graph.ir_version = min(graph.ir_version, 8)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = small(x).numpy()
    (got,) = sess.run(None, {"lr": x.numpy()})
    assert got.shape == (1, 3, 44, 52) and np.abs(got - ref).max() <= 1e-4


# --------------------------------------------------------------------------- learned scales on the stream


def test_stream_scales_per_producer_fold_exactly():
    model = dense(2)
    groups = ADAPTER.channel_groups(model)
    cs = ChannelScales(model, groups, reg=0.1)
    assert cs.scales["stream"].shape == (4, 8) and cs.scales["body.0.conv1"].shape == (8,)
    with torch.no_grad():
        ref = model(X)
    cs.attach(model)
    with torch.no_grad():
        assert (model(X) - ref).abs().max() <= 1e-6  # scales start at 1
        cs.scales["stream"].uniform_(0.5, 1.5)
        cs.scales["upsample.0"].uniform_(0.5, 1.5)
        hooked = model(X)
    assert (hooked - ref).abs().max() > 1e-3
    imp = cs.importance()
    assert torch.allclose(imp["stream"], cs.scales["stream"].detach().abs().mean(0))
    cs.mark({"stream": {p: [0, 1, 2, 3] for p in groups[0].producers}})
    assert cs.unimportant["stream"].tolist() == [False] * 4 + [True] * 4
    pen = cs.penalty()
    assert torch.allclose(pen, 0.1 * cs.scales["stream"][:, 4:].pow(2).sum())
    cs.fold()
    with torch.no_grad():
        assert (model(X) - hooked).abs().max() <= 1e-5
    assert torch.allclose(cs.folded_importance["stream"], imp["stream"])
    with pytest.raises(PlanError, match="keep different unit indices"):
        cs.mark({"stream": {p: [0, 1, 2, i] for i, p in enumerate(groups[0].producers, 3)}})


def test_alignment_penalty_pushes_producer_masks_together():
    model = dense(2)
    groups = ADAPTER.channel_groups(model)
    cs = ChannelScales(model, groups, align=1.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cs.scales["stream"].copy_(1 + 0.5 * torch.randn(4, 8, generator=g))
    assert cs.alignment_penalty() is None  # no marks yet: nothing to align to
    cs.mark({"stream": [0, 1, 2, 3]})
    assert cs.regularizer() is not None

    def disagreement() -> float:
        m = cs.soft_masks("stream").detach()
        return float((m.unsqueeze(0) - m.unsqueeze(1)).abs().sum())

    def kept_sets() -> list[set[int]]:  # each producer's 4 largest scales (its hard keep-set)
        return [set(t.tolist()) for t in torch.topk(cs.scales["stream"].detach(), 4, dim=1).indices]

    before = disagreement()
    assert len({frozenset(k) for k in kept_sets()}) > 1  # the producers start misaligned
    opt = torch.optim.SGD([cs.scales["stream"]], lr=10.0)
    for _ in range(120):
        opt.zero_grad()
        cs.alignment_penalty().backward()
        opt.step()
    assert disagreement() < 0.2 * before
    assert len({frozenset(k) for k in kept_sets()}) == 1  # now they agree on which units to keep
    assert torch.allclose(cs.penalty(), cs.alignment_penalty())  # reg 0: the penalty is the SSA term alone
    with pytest.raises(Exception, match="align must be a non-negative number"):
        ChannelScales(model, groups, align=-1.0)


# --------------------------------------------------------------------------- end to end (tiny)


@pytest.mark.parametrize("method", ["l1", "ssl"])
def test_tiny_edsr_channel_build(tmp_path, tiny_images, capsys, method):
    from conftest import run_cli, write_tiny_recipe, write_tiny_weights

    from sls_deploy.pruning.registry import load_plan

    recipe = write_tiny_recipe(tmp_path, tiny_images,
                               structured={"round_to": 2, "ssl_steps": 2, "delta": 1e-3, "grow_every": 1})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, stdout, err = run_cli(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                                "--method", method, "--out", out, "--no-progress")
    assert code == 0, err
    assert "channel pruning" in stdout and "verdict" in stdout
    report = (out / "report.md").read_text()
    assert "Channel groups" in report and "stream" in report and (out / "report_widths.png").is_file()
    plan = load_plan(out / "plan.json")
    stream = next(g for g in plan.groups if g.name == "stream")
    assert stream.producers[0] == "conv_first" and "conv_after_body" in stream.producers
    assert plan.ratio <= 0.6
    if method == "l1":  # uniform: every group, the stream too, is narrowed (ssl's global threshold may keep it)
        assert stream.kept_units < stream.dense_units
    graphs = sorted(out.glob("*.onnx"))
    assert graphs
    for path in graphs:
        graph = onnx.load(str(path))
        assert not {n.op_type for n in graph.graph.node} & {"Gather", "ScatterND", "ScatterElements"}
        inits = {t.name: tuple(t.dims) for t in graph.graph.initializer}
        if "conv_first.weight" in inits:
            assert inits["conv_first.weight"][0] == stream.kept_units


@pytest.mark.parametrize("method", ["l1", "ssl"])
def test_keep_full_stream_prunes_everything_else(tmp_path, tiny_images, capsys, method):
    """The stream-kept-full variant: the residual stream stays whole, block inner channels and the upsampler
    carry the whole budget."""
    from conftest import run_cli, write_tiny_recipe, write_tiny_weights

    from sls_deploy.pruning.registry import load_plan

    recipe = write_tiny_recipe(tmp_path, tiny_images,
                               structured={"round_to": 2, "ssl_steps": 2, "delta": 1e-3, "grow_every": 1})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", method, "--keep-full", "stream", "--out", out, "--steps", "2")
    assert code == 0, err
    plan = load_plan(out / "plan.json")
    widths = plan.widths
    assert widths["stream"] == 16 and plan.ratio <= 0.6
    assert all(w < 16 for g, w in widths.items() if g.startswith("body.")) or method == "ssl"
    assert sum(widths.values()) < 16 * len(widths)
    assert plan.search["kept_full"] == ["stream"]
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", method, "--keep-full", "strem", "--out", tmp_path / "c")
    assert code == 2 and "--keep-full 'strem' is not a channel group" in err and not (tmp_path / "c").exists()
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "oneshot", "--keep-full", "stream", "--out", tmp_path / "d")
    assert code == 2 and "does not apply to --method oneshot" in err


def test_edsr_default_is_ssl_with_the_stream_kept_full_and_none_prunes_it():
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.config.settings import Settings

    recipe = resolve_recipe("edsr", None)
    s = Settings.resolve(recipe, budget=0.4)
    assert (s.method, s.keep_full, s.round_to, s.target) == ("ssl", ("stream",), 16, "trt")
    assert Settings.resolve(recipe, budget=0.4, keep_full=("none",)).keep_full == ()
    assert Settings.resolve(recipe, budget=0.4, method="sls", target="none").strategy == "nm"
