"""The target cost model (--target): what a layer and a plan cost on TensorRT, a dense backend, or in MACs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sls_deploy.cli import main
from sls_deploy.models.edsr import EDSR
from sls_deploy.pruning.nm.oneshot import Candidate, plan_oneshot
from sls_deploy.pruning.nm.plan import DenseLayer, LayerPlan, Plan
from sls_deploy.pruning.nm.sls import SLSSearch, SLSSettings
from sls_deploy.pruning.target import can_save, layer_cost, n_cost_fractions

WIDE = (256, 256, 3, 3)
NARROW = (64, 64, 3, 3)


@pytest.mark.parametrize("shape,precision,n,target,expected", [
    (WIDE, "fp16/int8", 2, "trt", 500.0),   # 2:4 on a wide 3x3 conv: TensorRT's sparse kernel, half
    (WIDE, "fp16/int8", 1, "trt", 500.0),   # 1:4 runs on the 2:4 kernel: no cheaper than 2:4
    (WIDE, "fp16/int8", 3, "trt", 1000.0),  # 3:4 is not 2:4: dense
    (WIDE, "fp32", 2, "trt", 1000.0),       # an FP32 layer gets no sparse tactic
    (NARROW, "fp16/int8", 2, "trt", 1000.0),  # 64 channels: dense tactics win (TensorRT #3849, #4065, #1403)
    ((256, 256, 1, 1), "fp16/int8", 2, "trt", 1000.0),  # 1x1 conv
    ((256, 256), "fp16/int8", 2, "trt", 1000.0),  # Linear
    (WIDE, "fp16/int8", 2, "ort", 1000.0),  # a dense backend runs N:M at full cost
    (WIDE, "fp16/int8", 1, "none", 250.0),  # the paper's MACs: N/M
    (NARROW, "fp32", 3, "none", 750.0),
    (WIDE, "fp16/int8", 4, "none", 1000.0),
])
def test_layer_cost(shape, precision, n, target, expected):
    assert layer_cost(target, 1000, n, 4, shape, precision) == pytest.approx(expected)


def test_trt_counts_2to4_only_with_m4():
    assert n_cost_fractions("trt", 8, WIDE, "fp16/int8") == (1.0,) * 8  # 4:8 is not 2:4 everywhere
    assert n_cost_fractions("trt", 4, WIDE, "fp16/int8") == (0.5, 0.5, 1.0, 1.0)
    assert not can_save("ort", 4, WIDE, "fp16/int8") and can_save("none", 4, NARROW, "fp32")
    with pytest.raises(ValueError, match="--target must be one of"):
        layer_cost("gpu", 1000, 2, 4, WIDE, "fp16/int8")


def _plan(target: str) -> Plan:
    """A hand-computed net: a wide conv (1000 MACs), a narrow conv (600), a 1:4 wide conv kept FP32 (200), and a
    dense layer (200); 2000 MACs in all."""
    layers = [LayerPlan("wide", "conv", list(WIDE), 2, 4, 1000, precision="fp16/int8"),
              LayerPlan("narrow", "conv", list(NARROW), 2, 4, 600, precision="fp16/int8"),
              LayerPlan("island", "conv", list(WIDE), 1, 4, 200, precision="fp32")]
    return Plan(model="t", method="sls", budget=1.0, m=4, reference_output=[8, 8], layers=layers,
                dense_layers=[DenseLayer("d", 200, "x")], target=target)


@pytest.mark.parametrize("target,expected", [
    ("none", (500 + 300 + 50 + 200) / 2000),  # every layer at N/M
    ("trt", (500 + 600 + 200 + 200) / 2000),  # only the wide FP16/INT8 2:4 layer is halved
    ("ort", 1.0),                             # nothing N:M saves on a dense backend
])
def test_plan_target_ratio_by_hand(target, expected):
    plan = _plan(target)
    assert plan.target_ratio == pytest.approx(expected)
    assert plan.ratio == pytest.approx((500 + 300 + 50 + 200) / 2000)  # the MACs ratio does not depend on it
    assert plan.to_json()["macs"]["target_ratio"] == pytest.approx(expected)


def test_oneshot_on_trt_takes_2to4_not_3to4():
    fr = n_cost_fractions("trt", 4, WIDE, "fp16/int8")
    cands = [Candidate("a", "conv", WIDE, 800, fr), Candidate("b", "conv", WIDE, 200, fr)]
    dense = [DenseLayer("d", 1000, "x")]
    plan = plan_oneshot("t", cands, dense, 0.9, 4, [8, 8])  # 3:4 would be 0.875 in MACs, but costs 1.0 on trt
    assert {l.n for l in plan.layers} == {2}
    assert {l.n for l in plan_oneshot("t", cands, dense, 0.75, 4, [8, 8]).layers} == {2}  # (1000 + 500) / 2000
    with pytest.raises(Exception, match="smallest reachable budget is 0.7500"):
        plan_oneshot("t", cands, dense, 0.7, 4, [8, 8])


def test_sls_budget_test_counts_the_target_and_settles_to_the_largest_equal_cost_n():
    fr = n_cost_fractions("trt", 4, WIDE, "fp16/int8")
    ctl = SLSSearch([("a", 800), ("b", 200)], 1000, 0.8, SLSSettings(m=4), patch_scale=1.0,
                    fractions={"a": fr, "b": fr})
    ctl.gate("a").frozen = torch.tensor([0.0, 0.0, 0.0])  # N=1
    ctl.gate("b").frozen = torch.tensor([1.0, 1.0, 0.0])  # N=3
    assert ctl.pruned_macs() == pytest.approx(1000 + 400 + 200)  # 1:4 costs half, 3:4 full
    assert ctl.settle() == 2
    assert ctl.n_per_layer() == {"a": 2, "b": 4}  # same cost, more weights kept
    assert ctl.pruned_macs() == pytest.approx(1000 + 400 + 200)


@pytest.fixture()
def wide_recipe(tmp_path, tiny_recipe):
    """The tiny recipe with 256 channels (one block), target trt, and its random weights."""
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["model"].update(num_feat=256, num_block=1)
    raw["reference_output"] = [32, 32]
    raw["sparsity"]["target"] = "trt"
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    weights = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in EDSR(scale=4, num_feat=256, num_block=1).state_dict().items()},
              str(weights))
    return path, weights


def test_oneshot_plan_on_trt_prunes_only_what_tensorrt_accelerates(tmp_path, wide_recipe, capsys):
    path, weights = wide_recipe
    out = tmp_path / "b"
    assert main(["search", "--recipe", str(path), "--weights", str(weights), "--budget", "0.9",
                 "--method", "oneshot", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    names = {l["name"] for l in plan["layers"]}
    # 256->256 and 256->1024 3x3 convs; conv_first (3 in) is dense by the adapter, upsample.2 is an FP32 island
    # (it would be eligible by width) and conv_last (3 out) is dense by the adapter
    assert names == {"body.0.conv1", "body.0.conv2", "conv_after_body", "upsample.0"}
    dense = {d["name"]: d["reason"] for d in plan["dense_layers"]}
    assert "TensorRT is not expected" in dense["upsample.2"] and "FP32" in dense["upsample.2"]
    assert all(l["n"] == 2 and l["trt_predicted"] == "sparse 2:4" for l in plan["layers"])
    by_hand = (sum(l["macs_dense"] / 2 for l in plan["layers"]) + sum(d["macs"] for d in plan["dense_layers"])) \
        / plan["macs"]["dense"]
    assert plan["macs"]["target_ratio"] == pytest.approx(by_hand) and by_hand <= 0.9
    assert "cost on --target trt" in capsys.readouterr().out


def test_a_budget_below_what_the_target_can_reach_names_the_floor(tmp_path, wide_recipe, capsys):
    path, weights = wide_recipe
    out = tmp_path / "b"
    code = main(["search", "--recipe", str(path), "--weights", str(weights), "--budget", "0.3",
                 "--method", "oneshot", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be met" in err and "smallest reachable budget" in err and "--method ssl" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "plan.json").exists()


def test_channel_plan_costs_the_same_on_every_target(tmp_path, tiny_recipe, tiny_weights):
    ratios = {}
    for target in ("ort", "none"):
        out = tmp_path / target
        assert main(["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--budget", "0.6",
                     "--method", "l1", "--target", target, "--out", str(out)]) == 0
        plan = json.loads((out / "plan.json").read_text())
        assert plan["target"] == target and plan["macs"]["target_ratio"] == plan["macs"]["ratio"] <= 0.6
        ratios[target] = plan["macs"]["ratio"]
    assert ratios["ort"] == ratios["none"]


# --------------------------------------------------------------------------- hybrid: channels, then 2:4


def test_hybrid_on_a_narrow_model_is_channels_only_and_says_so(tmp_path, tiny_recipe, tiny_weights, capsys):
    out = tmp_path / "h"
    assert main(["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--budget", "0.6",
                 "--method", "hybrid", "--target", "trt", "--steps", "2", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["nm_layers"] == [] and "no 2:4" in plan["search"]["hybrid"]["note"]
    assert plan["macs"]["target_ratio"] == plan["macs"]["ratio"] <= 0.6


def test_hybrid_on_a_wide_model_adds_2to4_that_survives_into_the_graphs(tmp_path, wide_recipe, capsys):
    from safetensors.torch import load_file

    from sls_deploy.pruning.nm.patterns import is_2to4

    path, weights = wide_recipe
    out = tmp_path / "h"
    code = main(["build", "--recipe", str(path), "--weights", str(weights), "--budget", "0.7", "--method", "hybrid",
                 "--steps", "2", "--precision", "fp16", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    nm = plan["nm_layers"]
    assert nm and all(l["n"] == 2 and l["m"] == 4 and min(l["weight_shape"][:2]) >= 256 for l in nm)
    assert plan["search"]["hybrid"]["channel_budget"] > 0.7  # 2:4 pays for part of the budget
    # the cost by hand: the narrower model's MACs, each 2:4 layer at half
    sliced = sum(l["macs_pruned"] for l in plan["layers"]) + sum(d["macs"] for d in plan["dense_layers"])
    by_hand = (sliced - sum(l["macs_dense"] / 2 for l in nm)) / plan["macs"]["dense"]
    assert plan["macs"]["target_ratio"] == pytest.approx(by_hand) and by_hand <= 0.7
    sd = load_file(str(out / "model.safetensors"))
    assert all(is_2to4(sd[l["name"] + ".weight"]) for l in nm)
    export = json.loads((out / "manifest.json").read_text())["stages"]["export"]["result"]
    assert export["layers_2to4"] == len(nm) and export["graphs"]["fp16"]["layers_2to4"] == len(nm)
