"""SLS search and SR-STE: units from ranks, priority order, budget, freezing, baking, resume, reproducibility."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sls_deploy.cli import main
from sls_deploy.data import PatchSampler, resolve_images
from sls_deploy.models.edsr import EDSR
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.pruning.nm.patterns import is_nm, nm_mask
from sls_deploy.pruning.nm.sls import LayerGates, SLSSearch, SLSSettings, _UnitMask, group_ranks
from sls_deploy.pruning.nm.srste import SRSTE
from sls_deploy.training.loop import TrainConfig, train


@settings(max_examples=30, deadline=None)
@given(m=st.sampled_from([4, 8, 16, 32]), groups=st.integers(1, 3), cout=st.integers(1, 4),
       k=st.sampled_from([1, 3]), seed=st.integers(0, 10_000))
def test_ranks_are_a_permutation_and_units_give_top_n(m, groups, cout, k, seed):
    w = torch.randn(cout, groups * m, k, k, generator=torch.Generator().manual_seed(seed))
    ranks = group_ranks(w, m)
    assert ranks.dtype == torch.uint8 and ranks.shape == w.shape  # one byte per weight, not M masks
    grouped = ranks.permute(0, 2, 3, 1).reshape(-1, m).long()
    assert torch.equal(grouped.sort(-1).values, torch.arange(m).expand_as(grouped))
    mags = w.abs().permute(0, 2, 3, 1).reshape(-1, m)
    assert torch.equal(grouped.argmin(-1), mags.argmax(-1))  # rank 0 is the largest magnitude
    # units 0..N-1 together are exactly the top-N magnitude mask
    for n in (1, m // 2, m):
        assert torch.equal(ranks.long() < n, nm_mask(w, n, m))


def test_priorities_close_small_units_first():
    g = LayerGates(m=8, clamp=1.03)
    with torch.no_grad():
        g.scores.copy_(torch.tensor([1.0, 0.9, 0.4, 1.0, 1.0, 1.0, 1.0]))
    p = g.priorities()
    assert torch.all(p[1:] <= p[:-1])  # cumulative product: never increases
    assert g.hard().tolist() == [1, 1, 0, 0, 0, 0, 0]  # 0.9 > .5, 0.36 < .5 and everything after it closes
    assert g.n() == 3
    # straight-through: the forward value is the hard gate, the gradient reaches the scores
    gates = g.gates()
    assert torch.equal(gates.detach(), g.hard())
    gates.sum().backward()
    assert g.scores.grad is not None and g.scores.grad.abs().sum() > 0


def test_unit_mask_matches_layer_n():
    w = torch.randn(6, 16, 3, 3)
    g = LayerGates(m=4, clamp=1.03)
    with torch.no_grad():
        g.scores.copy_(torch.tensor([1.0, 0.3, 1.0]))  # N = 2
    masked = _UnitMask(g, group_ranks(w, 4))(w)
    assert torch.equal(masked != 0, nm_mask(w, 2, 4))


def _tiny_search(budget, lam, steps, seed=0, checkpoint=None, run_key=""):
    torch.manual_seed(seed)
    model = EDSR(scale=4, num_feat=16, num_block=2)
    macs = layer_macs(model, torch.rand(1, 3, 24, 32))
    names = [n for n in macs if n not in ("conv_first", "conv_last")]
    ctl = SLSSearch([(n, macs[n]) for n in names], macs["conv_first"] + macs["conv_last"], budget,
                    SLSSettings(m=4, lam=lam, score_lr=0.3, check_every=1, refresh_every=2),
                    patch_scale=64 / (24 * 32))
    sampler = PatchSampler(resolve_images("skimage:eval"), 4, 8, 2, seed=seed)
    return model, ctl, sampler, names


def test_search_reaches_budget_freezes_and_bakes_exact_nm():
    model, ctl, sampler, names = _tiny_search(budget=0.5, lam=1e-3, steps=20)
    result = train(model, sampler, TrainConfig(steps=20, lr=1e-4), controller=ctl, progress=False)
    assert ctl.finished and result.steps_done == ctl.frozen_at < 20  # stopped early, at the budget
    assert ctl.ratio() <= 0.5
    mods = dict(model.named_modules())
    for name in names:
        n = ctl.gate(name).n()
        w = mods[name].weight
        assert type(w) is torch.nn.Parameter  # the parametrization is gone
        groups = (w.detach() != 0).permute(0, 2, 3, 1).reshape(-1, 4).sum(-1)
        assert torch.all(groups == n), name


def test_search_out_of_steps_is_forced_into_budget():
    model, ctl, sampler, names = _tiny_search(budget=0.5, lam=0.0, steps=2)  # no pressure: gates stay open
    from sls_deploy.pruning.nm.search import _FinalizeSearch

    wrapped = _FinalizeSearch(ctl)
    train(model, sampler, TrainConfig(steps=2, lr=1e-4), controller=wrapped, progress=False)
    assert not ctl.finished and ctl.closed_by_force > 0
    assert ctl.ratio() <= 0.5
    mods = dict(model.named_modules())
    assert all(is_nm(mods[n].weight, ctl.gate(n).n(), 4) for n in names)


def test_search_resume_equals_uninterrupted(tmp_path, monkeypatch):
    model_a, ctl_a, sampler_a, _ = _tiny_search(budget=0.45, lam=3e-4, steps=8)
    train(model_a, sampler_a, TrainConfig(steps=8, lr=1e-4), controller=ctl_a, progress=False)

    model_b, ctl_b, sampler_b, _ = _tiny_search(budget=0.45, lam=3e-4, steps=8)
    ckpt = tmp_path / "s.ckpt"
    real, calls = PatchSampler.batch, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(PatchSampler, "batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(model_b, sampler_b, TrainConfig(steps=8, lr=1e-4), controller=ctl_b, checkpoint=ckpt, resume=True,
              run_key="k", progress=False)
    monkeypatch.setattr(PatchSampler, "batch", real)
    model_c, ctl_c, sampler_c, _ = _tiny_search(budget=0.45, lam=3e-4, steps=8)
    train(model_c, sampler_c, TrainConfig(steps=8, lr=1e-4), controller=ctl_c, checkpoint=ckpt, resume=True,
          run_key="k", progress=False)
    assert ctl_c.n_per_layer() == ctl_a.n_per_layer()
    assert ctl_c.frozen_at == ctl_a.frozen_at
    for (k, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6, msg=k)


def test_srste_trains_dense_weights_and_bakes_nm():
    torch.manual_seed(0)
    model = EDSR(scale=4, num_feat=16, num_block=1)
    layers = [("body.0.conv1", 2), ("body.0.conv2", 1)]
    ctl = SRSTE(layers, m=4, decay=2e-4)
    ctl.attach(model)
    w = model.body[0].conv1.parametrizations.weight.original
    # forward value is masked, gradient reaches every dense weight (straight-through)
    assert torch.equal(model.body[0].conv1.weight != 0, nm_mask(w, 2, 4))
    x = torch.rand(1, 3, 8, 8)
    (model(x).sum() + ctl.regularizer()).backward()
    pruned = ~nm_mask(w, 2, 4)
    assert (w.grad[pruned] != 0).float().mean() > 0.9
    ctl.detach(model)
    assert is_nm(model.body[0].conv1.weight, 2, 4) and is_nm(model.body[0].conv2.weight, 1, 4)


@pytest.mark.parametrize("method", ["sls", "srste"])
def test_build_with_method(capsys, tmp_path, tiny_recipe, tiny_weights, method):
    out = tmp_path / method
    code = main(["build", "--recipe", str(tiny_recipe), "--budget", "0.5", "--method", method, "--weights",
                 str(tiny_weights), "--out", str(out), "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads(captured.out)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == method and rep["macs"]["ratio"] <= 0.5
    assert rep["onnx_vs_torch"]["passed"]
    manifest = json.loads((out / "manifest.json").read_text())
    if method == "sls":
        assert (out / "search.safetensors").is_file()
        search_steps = plan["search"]["steps"]
        assert 1 <= search_steps <= 3
        assert manifest["stages"]["finetune"]["result"]["steps"] == 4 - search_steps  # same total as oneshot
    assert plan["target"] == "none" and plan["macs"]["target_ratio"] == pytest.approx(plan["macs"]["ratio"])
    assert not any("trt_kernel" in layer for layer in plan["layers"])


def test_same_seed_same_plan(tmp_path, tiny_recipe, tiny_weights, capsys):
    plans = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["search", "--recipe", str(tiny_recipe), "--budget", "0.45", "--method", "sls", "--weights",
                     str(tiny_weights), "--out", str(out), "--no-progress"]) == 0
        plans.append([(l["name"], l["n"]) for l in json.loads((out / "plan.json").read_text())["layers"]])
    assert plans[0] == plans[1]


@pytest.mark.parametrize("args, fragment", [
    (["--lam", "-1"], "lam"), (["--alpha", "0.5"], "alpha"), (["--alpha", "abc"], "not a valid float"),
    (["--m", "5"], "'5' is not one of"), (["--m", "abc"], "is not one of")])
def test_bad_search_settings(capsys, tmp_path, tiny_recipe, args, fragment):
    code = main(["build", "--recipe", str(tiny_recipe), "--budget", "0.5", "--method", "sls", *args,
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, code, fragment", [
    (["--method", "oneshot", "--n", "0"], 2, "--n must be in 1..4"),
    (["--method", "oneshot", "--n", "9"], 2, "--n must be in 1..4"),
    (["--method", "oneshot", "--n", "x"], 2, "not a valid integer"),
    (["--method", "sls", "--n", "2"], 2, "SLS chooses N per layer"),
    (["--method", "oneshot", "--n", "3", "--budget", "0.5"], 1, "above the budget 0.5"),
])
def test_bad_uniform_n(capsys, tmp_path, tiny_recipe, tiny_weights, args, code, fragment):
    argv = ["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--out", str(tmp_path / "b")]
    if "--budget" not in args:
        argv += ["--budget", "0.5"]
    assert main(argv + args) == code
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_explicit_uniform_n(capsys, tmp_path, tiny_recipe, tiny_weights):
    out = tmp_path / "b"
    assert main(["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--budget", "0.9",
                 "--method", "oneshot", "--n", "2", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert {l["n"] for l in plan["layers"]} == {2}  # 3:4 would fit 0.9, but N=2 was asked for


def test_model_without_eligible_layer(capsys, tmp_path, tiny_recipe):
    import yaml
    from safetensors.torch import save_file

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["model"]["num_feat"] = 6  # no input channel count divides by 4
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(raw))
    weights = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in EDSR(scale=4, num_feat=6, num_block=2).state_dict().items()}, str(weights))
    code = main(["build", "--recipe", str(path), "--budget", "0.5", "--weights", str(weights),
                 "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no layer eligible" in err and "Traceback" not in err


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_nm_on_a_target_that_accelerates_nothing_is_refused(tmp_path, tiny_recipe, tiny_weights, capsys, target):
    """A 16-channel model: TensorRT picks no 2:4 kernel for it and a dense backend never does, so an N:M plan
    would prune for nothing; the error names what can prune it instead and nothing is written."""
    out = tmp_path / target
    code = main(["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--budget", "0.5",
                 "--method", "oneshot", "--target", target, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"saves nothing on --target {target}" in err and "--method ssl" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "plan.json").exists()
