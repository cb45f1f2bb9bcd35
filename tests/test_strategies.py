"""The pruning strategy contract (pruning/strategy.py, pruning/registry.py): one strategy per method name of the
vocabulary, each settings check a one-line usage error, plans resolved to their strategy, and the group Taylor
criterion (pruning/channels/importance.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import CHECKOUT, error_line, run_cli, write_tiny_recipe, write_tiny_weights

from sls_deploy.config.recipe import load_recipe
from sls_deploy.config.settings import Settings
from sls_deploy.core import vocabulary as v
from sls_deploy.core.errors import UsageError
from sls_deploy.models.base import ChannelGroup as Group
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.importance import (RANKINGS, FisherPerMac, L1Importance, TaylorPerMac,
                                                    ranking_for)
from sls_deploy.pruning.channels.plan import StructuredPlan
from sls_deploy.pruning.channels.selection import select_global
from sls_deploy.pruning.channels.strategy import ChannelStrategy, ImportedChannels
from sls_deploy.pruning.nm.plan import Plan
from sls_deploy.pruning.nm.strategy import Imported, NMStrategy
from sls_deploy.pruning.registry import STRATEGIES, strategy_for, strategy_of


# -- the registry agrees with the vocabulary ----------------------------------------------------------------------
def test_one_strategy_per_method_name():
    assert set(STRATEGIES) == set(v.FAMILY_OF)
    assert {n for n, s in STRATEGIES.items() if s.user_method} == set(v.METHODS)
    assert all(s.name == n and s.family == v.FAMILY_OF[n] for n, s in STRATEGIES.items())


@pytest.mark.parametrize("fact, group", [("searches_sls", v.SLS_SEARCH), ("learns_scales", v.LEARNED_SCALES),
                                         ("has_nm_part", v.WITH_NM_PART), ("uniform_widths", v.UNIFORM_WIDTHS)])
def test_strategy_facts_match_the_vocabulary_groups(fact, group):
    assert {n for n, s in STRATEGIES.items() if getattr(s, fact)} == set(group)


def test_the_cli_takes_its_method_names_from_the_vocabulary():
    from sls_deploy import cli

    assert cli.NM_METHODS is v.NM_METHODS and cli.CHANNEL_METHODS is v.CHANNEL_METHODS
    assert v.METHODS == v.NM_METHODS + v.CHANNEL_METHODS


def test_the_vocabulary_imports_no_torch():
    code = "import sys, sls_deploy.core.vocabulary; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_method_is_a_bundle_error_naming_the_known_ones():
    with pytest.raises(Exception, match="unknown method 'magic' \\(known: sls, oneshot, srste, ssl, l1"):
        strategy_for("magic")


def _plan(method: str) -> Plan:
    return Plan(model="m", method=method, budget=0.5, m=4, reference_output=[8, 8], layers=[], dense_layers=[])


def _structured(method: str) -> StructuredPlan:
    return StructuredPlan(model="m", method=method, budget=0.5, round_to=1, reference_output=[8, 8], frames=1,
                          groups=[], layers=[], dense_layers=[])


def test_a_plan_resolves_to_its_methods_strategy_or_its_family():
    assert strategy_of(_plan("srste")) is STRATEGIES["srste"]
    assert isinstance(strategy_of(_plan("imported")), Imported)
    assert isinstance(strategy_of(_structured("imported-channels")), ImportedChannels)
    # an importer's own method name, or a name of the other family, falls back to the plan's family
    assert type(strategy_of(_structured("torch-pruning"))) is ChannelStrategy
    assert type(strategy_of(_structured("sls"))) is ChannelStrategy
    assert type(strategy_of(_plan("l1"))) is NMStrategy


def test_an_imported_channel_plan_is_not_searched_and_holds_no_masks():
    s = STRATEGIES["imported-channels"]
    with pytest.raises(NotImplementedError):
        s.select(None, None)
    hooks = s.training(torch.nn.Conv2d(1, 1, 1), _structured("imported-channels"), None, None)
    assert hooks.masks is None and hooks.controller is None


# -- every strategy's settings checks: one-line usage errors ------------------------------------------------------
@pytest.fixture
def recipe(tmp_path, tiny_images):
    return load_recipe(write_tiny_recipe(tmp_path, tiny_images))


@pytest.mark.parametrize("method, options, message", [
    ("magic", {}, "unknown method 'magic' (known: sls, oneshot, srste, ssl, l1, l1-global, hybrid)"),
    ("sls", {"round_to": 4}, "--round-to does not apply to --method sls (a channel-pruning option)"),
    ("srste", {"keep_full": ("stream",)}, "--keep-full does not apply to --method srste (a channel-pruning option)"),
    ("l1", {"lam": 1e-3}, "--lam does not apply to --method l1 (an N:M option)"),
    ("hybrid", {"m": 8}, "--m does not apply to --method hybrid (an N:M option)"),
    ("oneshot", {"alpha": 1.5}, "--alpha is an SLS search setting; it does nothing with --method oneshot"),
    ("sls", {"n": 2}, "--n fixes a uniform N: use it with --method oneshot or srste (SLS chooses N per layer)"),
    ("l1-global", {"selection": "raw"},
     "--selection applies to the learned scales of --method ssl/hybrid, not l1-global"),
    ("ssl", {"steps": 1}, "--method ssl learns its channel scales by training, then finetunes the narrower model: "
                          "give --steps >= 2, not 1"),
    ("hybrid", {"units": "member.json", "steps": 4},
     "given kept units (a nested family member) apply to channel methods other than hybrid"),
])
def test_settings_checks_are_one_line_usage_errors(recipe, method, options, message):
    with pytest.raises(UsageError) as e:
        Settings.resolve(recipe, budget=0.5, method=method, **options)
    assert str(e.value) == message and "\n" not in str(e.value)


def test_a_channel_option_on_the_command_line_exits_2_in_one_line(capsys, tmp_path, tiny_images):
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--budget", "0.5", "--method", "oneshot",
                           "--selection", "fisher", "--out", tmp_path / "b")
    assert code == 2
    assert error_line(err) == "error: --selection does not apply to --method oneshot (a channel-pruning option)"


# -- group Taylor importance: the criterion added through the Importance interface ------------------------------
class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Batches:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def batch(self):
        return torch.rand(2, 2, 5, 4, generator=self.g), torch.rand(2, 2, 5, 4, generator=self.g)


GROUP = Group(name="mid", producer="a", consumers=("b",))


def _taylor_by_hand(model, batches) -> torch.Tensor:
    """|w * mean gradient| summed over unit k's producer row (weights and bias) and consumer column."""
    model.zero_grad()
    for x, y in batches:
        (F.l1_loss(model(x), y) / len(batches)).backward()
    a, b = model.a, model.b
    per = (a.weight * a.weight.grad).abs().sum((1, 2, 3)) + (a.bias * a.bias.grad).abs()
    per = per + (b.weight * b.weight.grad).abs().sum((0, 2, 3))
    model.zero_grad()
    return per.detach()


def test_taylor_scores_are_the_group_sum_of_weight_times_gradient():
    torch.manual_seed(0)
    model = _Two()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    src = _Batches(3)
    batches = [src.batch() for _ in range(4)]
    raw = TaylorPerMac(None, F.l1_loss).measure(model, [GROUP], iter(batches))
    want = _taylor_by_hand(model, batches)
    assert torch.allclose(raw["mid"], want, rtol=1e-5, atol=1e-9)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())  # the weights are untouched
    assert all(p.grad is None for p in model.parameters())  # and no gradient is left behind


def test_taylor_per_mac_drops_a_dead_unit_first_and_compares_groups_raw():
    torch.manual_seed(1)
    model = _Two()
    with torch.no_grad():  # unit 1 of the group does nothing: its row, bias and column are zero
        model.a.weight[1] = 0
        model.a.bias[1] = 0
        model.b.weight[:, 1] = 0
    costs = GroupCosts.measure(model, [GROUP], torch.rand(1, 2, 5, 4))
    crit = ranking_for("taylor", lambda: _Batches(5), F.l1_loss)
    assert isinstance(crit, TaylorPerMac) and crit.normalize is False and RANKINGS["taylor"] is TaylorPerMac
    scores = crit.scores(model, [GROUP], costs)
    assert float(scores["mid"][1]) == 0.0 and bool((scores["mid"][[0, 2]] > 0).all())
    keep = select_global(scores, costs, 0.7, 1, normalize=crit.normalize)
    assert keep["mid"].tolist() == [0, 2]
    assert "Taylor" in crit.info["importance"] and "Taylor" in crit.info["marks"]


def test_other_selections_rank_by_l1_and_fisher_is_registered():
    assert isinstance(ranking_for("normalised", None, None), L1Importance)
    assert isinstance(ranking_for("raw", None, None), L1Importance)
    assert RANKINGS["fisher"] is FisherPerMac
    assert set(RANKINGS) <= set(v.SELECTIONS)


def test_taylor_selection_search_on_tiny_edsr(tmp_path, tiny_images, capsys):
    from sls_deploy.pruning.registry import load_plan

    recipe = write_tiny_recipe(tmp_path, tiny_images,
                               structured={"round_to": 2, "ssl_steps": 2, "delta": 1e-3, "grow_every": 1})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "ssl", "--selection", "taylor", "--out", tmp_path / "b", "--steps", "3")
    assert code == 0, err
    plan = load_plan(tmp_path / "b" / "plan.json")
    assert plan.ratio <= 0.6 and plan.search["importance"].startswith("group Taylor")
    assert all(n == 0 for n in plan.search["kept_marked_units"].values())  # the kept units are the Taylor marks
