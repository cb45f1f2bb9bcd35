"""Nested channel families: nested kept units from one ranking (each member within its budget), switchable unit
masks equal to the sliced members, joint training of one shared weight set, and `build --nested` end to end
(members' units nested, members' weights slices of the one shared set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from safetensors.torch import load_file

from sls_deploy.adaptive.family import FAMILY
from sls_deploy.adaptive.nested import NESTED_DIR, SHARED, nested_keeps, train_shared
from sls_deploy.core.errors import PlanError
from sls_deploy.data.patches import PatchSampler
from sls_deploy.models import get_adapter
from sls_deploy.pruning.channels.masks import UnitMasks, is_nested
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import widths_of
from sls_deploy.pruning.channels.importance import l1_importance
from sls_deploy.pruning.channels.slicing import slice_into
from sls_deploy.training.loop import TrainConfig

ADAPTER = get_adapter("edsr")
X = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(5))


def tiny(seed: int = 0, widths: dict | None = None):
    torch.manual_seed(seed)
    section = {"arch": "edsr", "scale": 2, "num_feat": 8, "num_block": 2, "res_scale": 1.0}
    if widths:
        section["widths"] = widths
    model = ADAPTER.build(ADAPTER.parse_config(section)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    return model


def costs_of(model):
    groups = ADAPTER.channel_groups(model)
    return groups, GroupCosts.measure(model, groups, X[:1])


@hsettings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), budgets=st.lists(st.floats(0.3, 1.0), min_size=2, max_size=4, unique=True),
       round_to=st.sampled_from([1, 2, 4]), uniform=st.booleans())
def test_nested_keeps_are_nested_and_within_budget(seed, budgets, round_to, uniform):
    model = tiny()
    groups, costs = costs_of(model)
    gen = torch.Generator().manual_seed(seed)
    rank = {g.name: torch.rand(costs.units[g.name], generator=gen) for g in groups}
    keeps = nested_keeps(rank, costs, budgets, round_to, uniform=uniform)
    order = sorted(budgets)
    assert list(keeps) == order
    for b in order:
        assert costs.total(widths_of(keeps[b])) <= b * costs.dense * (1 + 1e-9)
    for lo, hi in zip(order[:-1], order[1:]):
        assert is_nested(keeps[lo], keeps[hi])
        assert all(set(keeps[lo][g].tolist()) <= set(keeps[hi][g].tolist()) for g in keeps[lo])


def test_is_nested():
    assert is_nested({"a": torch.tensor([1, 3])}, {"a": torch.tensor([0, 1, 3])})
    assert not is_nested({"a": torch.tensor([1, 2])}, {"a": torch.tensor([0, 1, 3])})
    assert is_nested({"a": torch.tensor([1, 2])}, {})  # absent from the larger: whole there


def test_unit_masks_compute_each_sliced_member():
    model = tiny()
    groups, costs = costs_of(model)
    rank = {g.name: l1_importance(model, g) for g in groups}
    keeps = nested_keeps(rank, costs, [0.4, 0.7], 2)
    masks = UnitMasks(model, groups, {"small": keeps[0.4], "large": keeps[0.7]})
    masks.attach(model)
    with torch.no_grad():
        whole = model(X)
        for name, b in (("small", 0.4), ("large", 0.7)):
            masks.use(name)
            masked = model(X)
            small = tiny(widths=widths_of(keeps[b]))
            slice_into(model, small, groups, keeps[b])
            assert torch.allclose(masked, small(X), atol=1e-5)
            assert not torch.allclose(masked, whole, atol=1e-3)
        masks.use(None)
        assert torch.equal(model(X), whole)
    masks.detach()
    with pytest.raises(PlanError, match="unknown member"):
        masks.use("medium")
    with pytest.raises(PlanError, match="not a channel group"):
        UnitMasks(model, groups, {"x": {"nope": torch.tensor([0])}})


def test_joint_training_moves_the_shared_weights_and_leaves_no_hooks(tiny_images):
    model = tiny()
    groups, costs = costs_of(model)
    rank = {g.name: l1_importance(model, g) for g in groups}
    keeps = nested_keeps(rank, costs, [0.4, 0.7], 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = PatchSampler(sorted(tiny_images["train"].glob("*.png")), 2, 6, 2, seed=0)
    result = train_shared(model, groups, {"a": keeps[0.4], "b": keeps[0.7]}, sampler, TrainConfig(steps=3, lr=1e-3),
                          progress=False)
    assert result.steps_done == 3
    after = model.state_dict()
    assert set(after) == set(before)  # the plain model's names (no wrapper prefix)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.modules())


def test_nested_family_build(tmp_path, tiny_recipe, tiny_weights, capsys):
    from conftest import run_cli

    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.pruning.registry import load_plan
    from sls_deploy.backends.loading import model_config

    fam = tmp_path / "fam"
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--weights", tiny_weights, "--budget", "0.7",
                           "--budget", "0.45", "--method", "l1-global", "--round-to", "2", "--steps", "2",
                           "--precision", "fp32", "--nested", "--out", fam, "--no-progress")
    assert code == 0, err
    family = json.loads((fam / FAMILY).read_text())
    assert family["nested"]["members"] == ["b0.45", "b0.70"] and family["nested"]["steps"] == 2
    shared = load_file(str(fam / SHARED))
    plans = {f: load_plan(fam / f / "plan.json") for f in ("b0.45", "b0.70")}
    small = {g.name: g.kept for g in plans["b0.45"].groups}
    large = {g.name: g.kept for g in plans["b0.70"].groups}
    assert all(set(small[g]) <= set(large[g]) for g in small) and small != large
    assert plans["b0.45"].ratio <= 0.45 and plans["b0.70"].ratio <= 0.7
    recipe = load_recipe(tiny_recipe)
    dense = recipe.build_model()
    dense.load_state_dict(shared)
    groups = recipe.adapter.channel_groups(dense)
    for f, plan in plans.items():  # each member is the shared set sliced, tensor for tensor
        weights = load_file(str(fam / f / "model.safetensors"))
        record = json.loads((fam / NESTED_DIR / f"{f}.json").read_text())
        assert record["units"] == {g.name: g.kept for g in plan.groups}
        assert record["shared_weights"] == str((fam / SHARED).resolve()) == plan.search["shared_weights"]
        # the member's dense reference is the family's base, not the (never unmasked) shared network
        manifest = json.loads((fam / f / "manifest.json").read_text())
        assert Path(manifest["stages"]["search"]["base_weights"]).resolve() == Path(tiny_weights).resolve()
        narrow = recipe.adapter.build(model_config(recipe, plan.widths))
        slice_into(dense, narrow, groups, {g.name: torch.tensor(g.kept) for g in plan.groups})
        expected = narrow.state_dict()
        assert set(weights) == set(expected)
        assert all(torch.equal(weights[k].float(), expected[k].float()) for k in weights)
        assert plan.search["selection"].startswith("given")
    # a member's kept-units file whose shared weights changed is refused in one line
    from sls_deploy.pruning.channels.search import read_units_file
    record = json.loads((fam / NESTED_DIR / "b0.45.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record | {"shared_sha256": "0" * 64}))
    with pytest.raises(PlanError, match="changed since it was written"):
        read_units_file(bad)
    bad.write_text(json.dumps(record | {"shared_weights": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(PlanError, match="are missing"):
        read_units_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a kept-units record"):
        read_units_file(bad)
    # the same command again: everything done, nothing retrained
    stamp = (fam / SHARED).stat().st_mtime_ns
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--weights", tiny_weights, "--budget", "0.7",
                           "--budget", "0.45", "--method", "l1-global", "--round-to", "2", "--steps", "2",
                           "--precision", "fp32", "--nested", "--out", fam, "--no-progress")
    assert code == 0, err
    assert (fam / SHARED).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("args, fragment", [
    (["--budget", "0.5", "--nested"], "--nested builds a family"),
    (["--budget", "0.5", "--budget", "0.7", "--nested", "--method", "oneshot"], "--nested builds channel members"),
    (["--budget", "0.5", "--budget", "0.7", "--nested", "--method", "hybrid"], "--nested builds channel members"),
])
def test_nested_refusals(tmp_path, tiny_recipe, tiny_weights, capsys, args, fragment):
    from conftest import run_cli

    out = tmp_path / "fam"
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--weights", tiny_weights, *args, "--steps", "2",
                           "--out", out, "--no-progress")  # 2: ssl and hybrid need a step of each phase
    assert code == 2 and fragment in err
    assert not (out / SHARED).exists()
