"""Structured (channel) pruning on a tiny synthetic model: slicing equals zeroing, the pixel-shuffle unit,
exact MACs, width selection under a budget, learned scales (penalty growth, folding, the training loop),
importance and group checks."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sls_deploy.core.errors import BudgetError, PlanError
from sls_deploy.models.base import ChannelGroup as Group
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import check_groups, unit_count, widths_of
from sls_deploy.pruning.channels.importance import l1_importance
from sls_deploy.pruning.channels.scales import ChannelScales
from sls_deploy.pruning.channels.selection import select_global, select_uniform
from sls_deploy.pruning.channels.slicing import nm_eligible, slice_into, zero_units
from sls_deploy.training.loop import TrainConfig, train

PROPS = settings(max_examples=15, deadline=None)


class Tiny(nn.Module):
    """x2: conv_a(3->A) -> ReLU -> conv_b(A->4B) -> PixelShuffle(2) -> LeakyReLU -> conv_c(B->8) -> ReLU -> conv_d."""

    def __init__(self, a: int = 8, b: int = 16):
        super().__init__()
        self.conv_a = nn.Conv2d(3, a, 3, padding=1)
        self.conv_b = nn.Conv2d(a, 4 * b, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv_c = nn.Conv2d(b, 8, 3, padding=1)
        self.conv_d = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv_a(x))
        x = F.leaky_relu(self.shuffle(self.conv_b(x)), 0.1)
        x = F.relu(self.conv_c(x))
        return self.conv_d(x)


GROUPS = [Group("a", "conv_a", ("conv_b",)), Group("b", "conv_b", ("conv_c",), unit=4)]
X = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0))


def tiny(seed: int = 0, a: int = 8, b: int = 16) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(a, b).eval()


@functools.lru_cache(maxsize=1)
def tiny_costs() -> GroupCosts:
    return GroupCosts.measure(tiny(), GROUPS, X)


def complement(n: int, keep: torch.Tensor) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in set(keep.tolist())], dtype=torch.long)


def zeroed_and_sliced(keep: dict[str, torch.Tensor], seed: int = 0):
    src = tiny(seed)
    for g in GROUPS:
        zero_units(src, g, complement(unit_count(src, g), keep[g.name]))
    dst = Tiny(len(keep["a"]), len(keep["b"])).eval()
    slice_into(src, dst, GROUPS, keep)
    return src, dst


# --------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("keep_a, keep_b", [([0, 2, 3, 5, 7], [1, 4, 5, 8, 9, 10, 15]),
                                            ([7], [0]),
                                            (list(range(8)), [3, 11])])
def test_slicing_equals_zeroing(keep_a, keep_b):
    keep = {"a": torch.tensor(keep_a), "b": torch.tensor(keep_b)}
    src, dst = zeroed_and_sliced(keep)
    with torch.no_grad():
        assert torch.allclose(dst(X), src(X), atol=1e-5)
    assert dst.conv_b.weight.shape == (4 * len(keep_b), len(keep_a), 3, 3)
    assert torch.equal(dst.conv_b.weight[:4], src.conv_b.weight[4 * keep_b[0]:4 * keep_b[0] + 4][:, keep_a])


def test_a_single_channel_of_a_shuffle_group_is_not_a_unit():
    keep = {"a": torch.arange(8), "b": complement(16, torch.tensor([5]))}
    src = tiny()
    # zero one channel of unit 5 (as if the unit were 1): post-shuffle channel 5 still carries 3 sub-pixels
    zero_units(src, Group("b1", "conv_b", (), unit=1), torch.tensor([4 * 5 + 1]))
    dst = Tiny(8, 15).eval()
    slice_into(src, dst, GROUPS, keep)
    with torch.no_grad():
        assert (dst(X) - src(X)).abs().max() > 1e-3
    # zeroing the whole unit (4 channels) makes the same slicing exact
    zero_units(src, GROUPS[1], torch.tensor([5]))
    with torch.no_grad():
        assert torch.allclose(dst(X), src(X), atol=1e-5)


def test_slice_errors():
    src = tiny()
    keep = {"a": torch.tensor([0, 1]), "b": torch.arange(16)}
    with pytest.raises(PlanError, match=r"tensor .conv_a.weight.: the sliced source has shape \(2, 3, 3, 3\)"):
        slice_into(src, Tiny(3, 16), GROUPS, keep)  # target built with the wrong width
    with pytest.raises(PlanError, match="repeat"):
        slice_into(src, Tiny(2, 16), GROUPS, {"a": torch.tensor([1, 1]), "b": torch.arange(16)})
    with pytest.raises(PlanError, match="0..7"):
        slice_into(src, Tiny(2, 16), GROUPS, {"a": torch.tensor([0, 8])})
    with pytest.raises(PlanError, match="not a channel group"):
        slice_into(src, Tiny(), GROUPS, {"z": torch.tensor([0])})
    dw = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(PlanError, match="depthwise"):
        slice_into(dw, copy.deepcopy(dw), [Group("g", "0", ("1",))], {"g": torch.arange(4)})
    # groups absent from keep are copied whole
    dst = Tiny(2, 16)
    slice_into(src, dst, GROUPS, {"a": torch.tensor([3, 6])})
    assert torch.equal(dst.conv_c.weight, src.conv_c.weight)


# --------------------------------------------------------------------------- MACs


@settings(max_examples=8, deadline=None)  # each layer_macs call copies the model to meta (~0.1 s)
@given(a=st.integers(1, 8), b=st.integers(1, 16))
def test_costs_equal_layer_macs_of_the_sliced_model(a, b):
    costs = tiny_costs()
    measured = layer_macs(Tiny(a, b), X)
    assert costs.per_layer({"a": a, "b": b}) == measured
    assert costs.total({"a": a, "b": b}) == sum(measured.values())
    assert costs.ratio({}) == 1.0 and costs.dense == sum(layer_macs(Tiny(), X).values())


def test_cost_errors():
    costs = tiny_costs()
    with pytest.raises(PlanError, match="1..8"):
        costs.total({"a": 0})
    with pytest.raises(PlanError, match="not a channel group"):
        costs.total({"z": 1})
    with pytest.raises(PlanError, match="no MAC count"):
        GroupCosts({"conv_a": 10}, GROUPS[:1], {"a": 8})
    with pytest.raises(PlanError, match="two channel groups"):
        GroupCosts.measure(tiny(), GROUPS + [Group("c", "conv_a", ("conv_b",))], X)


# --------------------------------------------------------------------------- selection


@PROPS
@given(seed=st.integers(0, 1000), budget=st.floats(0.05, 1.0), round_to=st.sampled_from([1, 2, 4, 8]),
       uniform=st.booleans())
def test_selection_meets_the_budget_with_rounded_widths(seed, budget, round_to, uniform):
    costs = tiny_costs()
    gen = torch.Generator().manual_seed(seed)
    imps = {"a": torch.rand(8, generator=gen), "b": torch.rand(16, generator=gen) * 5}
    select = select_uniform if uniform else select_global
    lowest = costs.ratio(costs.min_widths(round_to))
    if lowest > budget:
        with pytest.raises(BudgetError, match=f"smallest reachable ratio is {lowest:.4f}"):
            select(imps, costs, budget, round_to)
        return
    keep = select(imps, costs, budget, round_to)
    widths = widths_of(keep)
    assert costs.total(widths) <= budget * costs.dense * (1 + 1e-9)
    for name, idx in keep.items():
        units = costs.units[name]
        assert torch.equal(idx, torch.sort(idx).values) and idx.dtype == torch.long
        assert widths[name] == units or widths[name] % round_to == 0
        assert widths[name] >= min(round_to, units)
        # the kept units are the most important ones of their group
        dropped = complement(units, idx)
        if len(dropped):
            assert imps[name][idx].min() >= imps[name][dropped].max()
    if uniform and round_to == 1:  # the same fraction everywhere: floor(f * units) for one f
        assert abs(widths["a"] / 8 - widths["b"] / 16) < 1 / 8
    if uniform:  # filled: the same fraction first, then no group can grow by one more step
        filled = widths_of(select_uniform(imps, costs, budget, round_to, fill=True))
        assert costs.total(widths) <= costs.total(filled) <= budget * costs.dense * (1 + 1e-9)
        assert all(filled[n] >= widths[n] for n in widths)
        for name, units in costs.units.items():
            if filled[name] < units:
                grown = min(units, (filled[name] // round_to + 1) * round_to)
                assert costs.total({**filled, name: grown}) > budget * costs.dense * (1 + 1e-9)
    if not uniform:  # the global selection leaves no rounding step unspent: no group can grow by one more step
        for name, units in costs.units.items():
            if widths[name] < units:
                grown = min(units, (widths[name] // round_to + 1) * round_to)
                assert costs.total({**widths, name: grown}) > budget * costs.dense * (1 + 1e-9)


def test_global_prunes_the_group_with_unimportant_units_uniform_prunes_all():
    costs = tiny_costs()
    imps = {"a": torch.ones(8), "b": torch.cat([torch.full((8,), 0.01), torch.full((8,), 10.0)])}
    budget = costs.ratio({"a": 8, "b": 8})
    keep = select_global(imps, costs, budget, round_to=4)
    assert widths_of(keep) == {"a": 8, "b": 8} and torch.equal(keep["b"], torch.arange(8, 16))
    uni = widths_of(select_uniform(imps, costs, budget, round_to=4))
    assert uni["a"] < 8 and costs.total(uni) <= budget * costs.dense
    assert widths_of(select_global(imps, costs, 1.0)) == {"a": 8, "b": 16}


def test_selection_errors():
    costs = tiny_costs()
    with pytest.raises(BudgetError, match="smallest reachable ratio"):
        select_global({"a": torch.rand(8), "b": torch.rand(16)}, costs, 0.01)
    with pytest.raises(PlanError, match="3 values for 8 units"):
        select_global({"a": torch.rand(3)}, costs, 0.5)
    with pytest.raises(PlanError, match="budget"):
        select_uniform({"a": torch.rand(8)}, costs, 1.5)
    # only the groups given are pruned: with "a" alone, "b" stays whole
    keep = select_uniform({"a": torch.rand(8)}, costs, 0.9, round_to=2)
    assert set(keep) == {"a"}


# --------------------------------------------------------------------------- learned scales


def test_penalty_grows_every_k_steps_up_to_the_cap_on_marked_units_only():
    model = tiny()
    cs = ChannelScales(model, GROUPS, reg=0.0, delta=0.5, grow_every=2, cap=1.2)
    cs.attach(model)
    assert cs.regularizer() is None and cs.penalty().item() == 0.0
    cs.mark({"b": torch.arange(12)})  # units 12..15 of b unimportant; a has none
    seen = []
    for step in range(1, 9):
        cs.after_step(model, step)
        cs.after_step(model, step)  # repeated bookkeeping (Ctrl-C) does not grow twice
        seen.append(cs.penalty().item())
    assert seen == pytest.approx([0, 2.0, 2.0, 4.0, 4.0, 4.8, 4.8, 4.8])  # reg 0.5, 1.0, 1.2 (cap) x 4 units
    assert cs.reg["a"] == 0.0
    with torch.no_grad():
        cs.scales["b"][:12] = 3.0  # kept units are not penalised
    assert cs.penalty().item() == pytest.approx(4.8)
    state = cs.state_dict()
    other = ChannelScales(model, GROUPS)
    other.load_state_dict(state)
    assert other.penalty().item() == pytest.approx(4.8) and other.last_step == 8
    cs.fold()


def test_fold_keeps_outputs_and_removes_hooks():
    model = tiny(1)
    cs = ChannelScales(model, GROUPS)
    with torch.no_grad():
        ref = model(X)
        cs.attach(model)
        assert torch.allclose(model(X), ref)  # scales start at 1
        for s in cs.parameters():
            s.copy_(torch.rand(s.shape) * 2)
        hooked = model(X)
        assert (hooked - ref).abs().max() > 1e-3
        cs.fold()
        assert torch.allclose(model(X), hooked, atol=1e-5)
    assert all(torch.equal(s, torch.ones_like(s)) for s in cs.parameters())
    assert not model.conv_a._forward_hooks and not model.conv_b._forward_hooks


class FakeSampler:
    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)

    def state(self):
        return self.gen.get_state()

    def set_state(self, s):
        self.gen.set_state(s)

    def batch(self):
        lr = torch.rand(2, 3, 4, 4, generator=self.gen)
        return lr, F.interpolate(lr, scale_factor=2)


def test_scales_in_the_training_loop():
    model = Tiny(8, 16)  # x2 upscaler: the pixel shuffle doubles the size
    cs = ChannelScales(model, GROUPS, reg=100.0, delta=1.0, grow_every=1, cap=1000.0, lr=0.05)
    cs.mark({"b": torch.arange(8)})  # units 8..15 unimportant
    seen = []
    train(model, FakeSampler(), TrainConfig(steps=3, lr=1e-3, checkpoint_every=0), controller=cs, progress=False,
          on_step=lambda step, loss: seen.append(cs.importance()["b"].clone()))
    assert len(seen) == 3
    assert (seen[-1][8:] < 1 - 0.1).all()  # the penalty pulls the marked scales down through the optimiser
    assert cs.reg["b"] == 103.0
    assert all(torch.equal(s, torch.ones_like(s)) for s in cs.parameters())  # detach folded them
    assert not model.conv_b._forward_hooks


# --------------------------------------------------------------------------- importance and group checks


def test_l1_importance_ranks_larger_filters_higher():
    model = tiny()
    with torch.no_grad():
        model.conv_b.weight[4 * 3:4 * 3 + 4] *= 10  # all four channels of unit 3
        model.conv_a.weight[6] *= 10
    imp_b = l1_importance(model, GROUPS[1])
    assert imp_b.shape == (16,) and int(imp_b.argmax()) == 3
    assert int(l1_importance(model, GROUPS[0]).argmax()) == 6
    raw = l1_importance(model, GROUPS[1], normalize=False)
    assert torch.allclose(raw, model.conv_b.weight.abs().reshape(16, -1).sum(1))
    assert torch.allclose(imp_b, raw / (4 * 8 * 9))  # mean |w| over unit * fan-in weights


def test_unit_count_and_group_errors():
    model = tiny()
    assert [unit_count(model, g) for g in GROUPS] == [8, 16]
    assert check_groups(model, GROUPS) == {"a": 8, "b": 16}
    with pytest.raises(PlanError, match="reads 16 channels"):
        unit_count(model, Group("a", "conv_a", ("conv_c",)))
    with pytest.raises(PlanError, match="not a multiple of the unit 3"):
        unit_count(model, Group("b", "conv_b", ("conv_c",), unit=3))
    with pytest.raises(PlanError, match="reads 16 channels"):
        unit_count(model, Group("b", "conv_b", ("conv_c",), unit=1))
    with pytest.raises(PlanError, match="not a Conv2d"):
        unit_count(model, Group("s", "shuffle", ()))
    with pytest.raises(PlanError, match="not a module"):
        unit_count(model, Group("s", "nope", ()))
    with pytest.raises(PlanError, match="declared twice"):
        check_groups(model, GROUPS + [GROUPS[0]])


def test_nm_eligibility_of_sliced_layers():
    assert nm_eligible(Tiny(8, 12), 4) == ["conv_b", "conv_c", "conv_d"]  # conv_a reads 3 channels
    assert nm_eligible(Tiny(6, 12), 4, names=["conv_b", "conv_c"]) == ["conv_c"]


def test_raw_selection_lets_magnitudes_compete_across_groups():
    """normalize=False (SSL's public code): one threshold on the raw values; a group of small values loses units
    that the per-group normalised selection would keep."""
    costs = tiny_costs()
    imps = {"a": torch.linspace(0.01, 0.08, 8), "b": torch.linspace(1.0, 16.0, 16)}
    budget = 0.6
    raw = widths_of(select_global(imps, costs, budget, round_to=1, normalize=False))
    normed = widths_of(select_global(imps, costs, budget, round_to=1))
    assert raw["a"] < normed["a"] and raw["b"] >= normed["b"]
    assert costs.total(raw) <= budget * costs.dense * (1 + 1e-9)
