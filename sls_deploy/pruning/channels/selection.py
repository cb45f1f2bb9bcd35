"""Width selection under a whole-model MAC budget: ``select_global`` (one threshold on importances across groups)
and ``select_uniform`` (the same kept fraction in every group, the L1-norm baseline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction

import torch

from sls_deploy.core.errors import BudgetError, PlanError
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.nm.oneshot import check_budget


def _rounded(count: int, units: int, round_to: int) -> int:
    """Round a kept count down to a multiple of round_to; full width stays; never below min(round_to, units)."""
    if count >= units:
        return units
    return max(min(round_to, units), count // round_to * round_to)


def _prepare(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float, round_to: int):
    budget = check_budget(budget)
    if not isinstance(round_to, int) or round_to < 1:
        raise PlanError(f"round_to must be an integer >= 1, not {round_to!r}")
    if not importances:
        raise PlanError("no channel group to prune")
    imps = {}
    for name, v in importances.items():
        if name not in costs.units:
            raise PlanError(f"importance given for '{name}', which is not a channel group")
        t = torch.as_tensor(v).detach().float().cpu().reshape(-1)
        if t.numel() != costs.units[name]:
            raise PlanError(f"importance of group '{name}' has {t.numel()} values for {costs.units[name]} units")
        if not bool(torch.isfinite(t).all()):
            raise PlanError(f"importance of group '{name}' is not finite")
        imps[name] = t
    limit = budget * costs.dense * (1 + 1e-9)
    lowest = costs.total(costs.min_widths(round_to, list(imps)))
    if lowest > limit:
        raise BudgetError(
            f"budget {budget:g} cannot be met by channel pruning: the smallest reachable ratio is "
            f"{lowest / costs.dense:.4f} (every pruned group at min({round_to}, units) units)")
    return imps, limit


def _top(imp: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values (ties: lowest index first), sorted ascending."""
    order = torch.argsort(imp, descending=True, stable=True)
    return torch.sort(order[:k]).values.long()


def top_units(importance: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` units of largest importance (ties: lowest index first), ascending: for one fixed ranking, the
    sets for growing k are nested."""
    t = torch.as_tensor(importance).detach().float().cpu().reshape(-1)
    if not 1 <= int(k) <= t.numel():
        raise PlanError(f"cannot keep {k} of {t.numel()} units")
    return _top(t, int(k))


def _last_true(n: int, fits: Callable[[int], bool]) -> int:
    """Largest i in 0..n-1 with fits(i), for fits true on a prefix (fits(0) must hold)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_global(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float,
                  round_to: int = 8, normalize: bool = True) -> dict[str, torch.Tensor]:
    """Kept units per group from one importance threshold shared by all groups, the lowest meeting the budget.

    With ``normalize`` (default) each group's importances are divided by their mean (unless all zero); without
    it the raw values compete (SSL's public code: one global threshold on the raw |scale| of every unit, there by
    a pruned-unit count, here the count the MAC budget allows). Normalised, groups measured on different
    scales compare. At threshold t a group keeps its units with normalised importance >= t, the count rounded
    down to a multiple of ``round_to`` (full width stays, at least min(round_to, units)), the top-k by
    importance. t is bisected over the importance values so that the whole model's MACs are <= budget * dense;
    what rounding left of the budget is then spent widening the groups whose next units matter most (``_fill``).
    Groups not in ``importances`` stay at full width. Returns {group: kept unit indices, ascending}.
    """
    imps, limit = _prepare(importances, costs, budget, round_to)
    normed = {n: (t / t.mean() if normalize and float(t.mean()) > 0 else t) for n, t in imps.items()}
    desc = {n: torch.sort(t, descending=True).values for n, t in normed.items()}
    # thresholds from the lowest (everything kept) up to +inf (every group at its minimum)
    cands = torch.unique(torch.cat(list(normed.values()))).tolist() + [float("inf")]

    def widths(i: int) -> dict[str, int]:
        t = cands[i]
        return {n: _rounded(int((d >= t).sum()), d.numel(), round_to) for n, d in desc.items()}

    # total MACs fall as the threshold rises: find the first threshold that fits (from the top, a prefix fits)
    rev = len(cands) - 1
    j = _last_true(len(cands), lambda k: costs.total(widths(rev - k)) <= limit)
    chosen = _fill(widths(rev - j), desc, costs, limit, round_to)
    return {n: _top(imps[n], chosen[n]) for n in imps}


def _fill(widths: dict[str, int], desc: Mapping[str, torch.Tensor], costs: GroupCosts, limit: float,
          round_to: int) -> dict[str, int]:
    """Spend what rounding left of the budget: repeatedly widen, by one step of ``round_to`` units, the group whose
    next units have the highest mean normalised importance, while the whole model still fits ``limit``."""
    widths = dict(widths)
    while True:
        best, best_score = None, -math.inf
        for n, d in desc.items():
            w = widths[n]
            if w >= d.numel():
                continue
            grown = min(d.numel(), (w // round_to + 1) * round_to)
            score = float(d[w:grown].mean())
            if score > best_score and costs.total({**widths, n: grown}) <= limit:
                best, best_score = (n, grown), score
        if best is None:
            return widths
        widths[best[0]] = best[1]


def select_uniform(importances: Mapping[str, torch.Tensor], costs: GroupCosts, budget: float,
                   round_to: int = 8, fill: bool = False) -> dict[str, torch.Tensor]:
    """The same kept fraction f in every group (L1-norm uniform pruning), the largest f meeting the budget.

    A group keeps floor(f * units) units rounded as in ``select_global``, the top-k by importance. With ``fill``,
    what the common fraction left of the budget is then spent as ``select_global`` does (``_fill``: one rounding
    step at a time, to the group whose next units matter most), so the result lands as close under the budget
    as the rounding allows (comparisons at equal MACs). Groups not in ``importances`` stay at full width.
    Returns {group: kept unit indices, ascending}.
    """
    imps, limit = _prepare(importances, costs, budget, round_to)
    cands = sorted({Fraction(k, t.numel()) for t in imps.values() for k in range(t.numel() + 1)})

    def widths(i: int) -> dict[str, int]:
        f = cands[i]
        return {n: _rounded(int(f * t.numel()), t.numel(), round_to) for n, t in imps.items()}

    i = _last_true(len(cands), lambda k: costs.total(widths(k)) <= limit)
    chosen = widths(i)
    if fill:
        normed = {n: (t / t.mean() if float(t.mean()) > 0 else t) for n, t in imps.items()}
        chosen = _fill(chosen, {n: torch.sort(t, descending=True).values for n, t in normed.items()}, costs, limit,
                       round_to)
    return {n: _top(imps[n], chosen[n]) for n in imps}
