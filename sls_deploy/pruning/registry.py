"""The pruning strategies by method name, and the plan file of either family.

One ``Strategy`` per method (``pruning.strategy``): ``nm`` methods put masks on weights (sls, oneshot, srste,
imported), ``channels`` methods remove units and slice the layers (ssl, l1, l1-global, hybrid, imported-channels;
hybrid is a channel plan with a 2:4 part). The stages ask this module for a method's or a plan's strategy and
call it; they never switch on a method name or a plan type.
"""

from __future__ import annotations

import os

from sls_deploy.core.errors import BundleError
from sls_deploy.core.vocabulary import METHODS
from sls_deploy.pruning.channels.plan import STRUCTURED_KIND, StructuredPlan
from sls_deploy.pruning.channels.strategy import L1, ChannelStrategy, Hybrid, ImportedChannels, L1Global, Ssl
from sls_deploy.pruning.nm.plan import Plan, read_plan_json
from sls_deploy.pruning.nm.strategy import Imported, NMStrategy, OneShot, Sls, SrSte
from sls_deploy.pruning.strategy import Strategy

STRATEGIES: dict[str, Strategy] = {cls.name: cls() for cls in (Sls, OneShot, SrSte, Imported, Ssl, L1, L1Global,
                                                                 Hybrid, ImportedChannels)}
_BY_PLAN = {Plan: NMStrategy(), StructuredPlan: ChannelStrategy()}  # plans whose method names no strategy


def strategy_for(method: str) -> Strategy:
    try:
        return STRATEGIES[method]
    except KeyError:
        raise BundleError(f"unknown method '{method}' (known: {', '.join(METHODS)})") from None


def strategy_of(plan) -> Strategy:
    """The strategy of a loaded plan: its method's, or its family's when an importer named the method."""
    found = STRATEGIES.get(getattr(plan, "method", ""))
    family = next(strategy for kind, strategy in _BY_PLAN.items() if isinstance(plan, kind))
    return found if found is not None and found.family == family.family else family


def load_plan(path: str | os.PathLike) -> Plan | StructuredPlan:
    """plan.json of either strategy (its ``kind`` says which)."""
    raw = read_plan_json(path)
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return (StructuredPlan if kind == STRUCTURED_KIND else Plan).parse(raw, path)
