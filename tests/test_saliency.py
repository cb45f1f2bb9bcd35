"""Fisher saliency of channel units (``pruning.channels.saliency``): per-sample squared gate gradients checked
against finite differences (a stream unit's gate is shared by every producer), zero for a dead unit, the weights
left as they were, exact per-unit MACs, and the --selection fisher search on a tiny EDSR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sls_deploy.core.errors import PlanError
from sls_deploy.models import get_adapter
from sls_deploy.pruning.channels.saliency import fisher_saliency, per_mac, unit_macs
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import producers_of, widths_of
from sls_deploy.pruning.channels.selection import select_global

ADAPTER = get_adapter("edsr")


def tiny_edsr(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ADAPTER.parse_config({"arch": "edsr", "scale": 2, "num_feat": 6, "num_block": 2, "res_scale": 1.0})
    model = ADAPTER.build(cfg).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    return model


def batches(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64),
             torch.rand(2, 3, 10, 8, generator=g, dtype=torch.float64)) for _ in range(n)]


def finite_difference(model, group, unit: int, data, eps: float = 1e-6) -> float:
    """1/2 mean over samples of (dL/dg)^2, dL/dg by central differences of scaling unit ``unit`` of every
    producer (weight rows and bias) by 1 +- eps."""
    mods = dict(model.named_modules())
    total, n = 0.0, 0
    for x, y in data:
        for i in range(x.shape[0]):
            losses = []
            for sign in (1, -1):
                with torch.no_grad():
                    for p in producers_of(group):
                        conv = mods[p]
                        rows = slice(unit * group.unit, (unit + 1) * group.unit)
                        conv.weight[rows] *= 1 + sign * eps
                        conv.bias[rows] *= 1 + sign * eps
                    losses.append(float(F.l1_loss(model(x[i:i + 1]), y[i:i + 1])))
                    for p in producers_of(group):
                        conv = mods[p]
                        rows = slice(unit * group.unit, (unit + 1) * group.unit)
                        conv.weight[rows] /= 1 + sign * eps
                        conv.bias[rows] /= 1 + sign * eps
            total += ((losses[0] - losses[1]) / (2 * eps)) ** 2
            n += 1
    return total / (2 * n)


@pytest.mark.parametrize("name", ["stream", "body.1.conv1", "upsample.0"])
def test_fisher_equals_finite_differences_of_a_shared_gate(name):
    model = tiny_edsr()
    groups = ADAPTER.channel_groups(model)
    group = next(g for g in groups if g.name == name)
    data = batches()
    sal = fisher_saliency(model, groups, data, F.l1_loss)
    assert set(sal) == {g.name for g in groups}
    for unit in (0, 3):
        expected = finite_difference(model, group, unit, data)
        assert expected > 0
        assert float(sal[name][unit]) == pytest.approx(expected, rel=1e-3)
    if name == "stream":  # one gate for the unit in every producer: not the sum of per-producer squares
        assert len(producers_of(group)) == 4


def test_dead_unit_has_zero_saliency_and_weights_are_untouched():
    model = tiny_edsr()
    groups = ADAPTER.channel_groups(model)
    with torch.no_grad():
        model.body[0].conv1.weight[2] = 0
        model.body[0].conv1.bias[2] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sal = fisher_saliency(model, groups, batches(), F.l1_loss)
    assert float(sal["body.0.conv1"][2]) == 0.0 and bool((sal["body.0.conv1"][[0, 1, 3]] > 0).all())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model.conv_first._forward_hooks
    with pytest.raises(PlanError, match="no calibration sample"):
        fisher_saliency(model, groups, [], F.l1_loss)


def test_unit_macs_and_per_mac_on_a_hand_counted_net():
    model = tiny_edsr().float()
    groups = ADAPTER.channel_groups(model)
    costs = GroupCosts.measure(model, groups, torch.rand(1, 3, 5, 4))
    hw = 5 * 4
    # one inner unit of block 0: one output row of conv1 (6*9 MACs/pixel) and one input column of conv2 (6*9)
    assert unit_macs(costs, ["body.0.conv1"]) == {"body.0.conv1": 2 * 6 * 9 * hw}
    # one stream unit: conv_first's row (3*9), a column of each conv1 and a row of each conv2 (6*9 each),
    # conv_after_body reads and writes it (6*6 -> 5*5 taps of 9), a column of the upsampler conv (24 rows * 9)
    expected = (3 * 9 + 2 * 6 * 9 + 2 * 6 * 9 + (36 - 25) * 9 + 24 * 9) * hw
    assert unit_macs(costs, ["stream"])["stream"] == expected
    sal = {"stream": torch.full((6,), 2.0), "body.0.conv1": torch.full((6,), 2.0)}
    out = per_mac(sal, costs)
    assert float(out["stream"][0]) == pytest.approx(2.0 / expected)
    assert float(out["body.0.conv1"][0]) > float(out["stream"][0])  # the same loss buys more MACs on the stream


def test_fisher_widths_under_a_budget():
    model = tiny_edsr().float()
    groups = ADAPTER.channel_groups(model)
    costs = GroupCosts.measure(model, groups, torch.rand(1, 3, 5, 4))
    rank = per_mac(fisher_saliency(model, groups, [(x.float(), y.float()) for x, y in batches()], F.l1_loss), costs)
    keep = select_global(rank, costs, 0.5, 2, normalize=False)
    assert costs.ratio(widths_of(keep)) <= 0.5
    for name, kept in keep.items():  # inside every group the kept units are those of highest saliency per MAC
        dropped = [i for i in range(costs.units[name]) if i not in set(kept.tolist())]
        if dropped:
            assert float(rank[name][kept].min()) >= float(rank[name][dropped].max())
    assert any(len(k) < costs.units[n] for n, k in keep.items())


def test_fisher_selection_search_on_tiny_edsr(tmp_path, tiny_images, capsys):
    from conftest import run_cli, write_tiny_recipe, write_tiny_weights

    from sls_deploy.pruning.registry import load_plan

    recipe = write_tiny_recipe(tmp_path, tiny_images,
                               structured={"round_to": 2, "ssl_steps": 2, "delta": 1e-3, "grow_every": 1,
                                           "selection": "fisher"})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "ssl", "--out", out, "--steps", "3")
    assert code == 0, err
    plan = load_plan(out / "plan.json")
    assert plan.ratio <= 0.6 and "Fisher" in plan.search["selection"]
    assert all(v == 0 for v in plan.search["kept_marked_units"].values())  # the kept units are the Fisher marks
    assert plan.search["marks"].startswith("units below the budget's global Fisher")
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "l1", "--out", tmp_path / "c", "--steps", "3")
    assert code == 0, err  # the recipe's selection is an ssl/hybrid default, not an error for l1
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "l1", "--selection", "fisher", "--out", tmp_path / "d")
    assert code == 2 and "--selection applies to" in err
