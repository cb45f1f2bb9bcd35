"""The pruning strategies by method name, and the plan file of either strategy.

A *strategy* is how a plan is made and applied: ``nm`` (masks on weights: sls, oneshot, srste) or ``channels``
(units removed and the layers sliced: ssl, l1, l1-global). The stages ask this module which one a method
belongs to; ``hybrid`` (ssl channels, then 2:4 on the narrower layers the target accelerates) is a channel plan
with an N:M part.
"""

from __future__ import annotations

import os

from sls_deploy.core.errors import BundleError
from sls_deploy.pruning.channels.plan import STRUCTURED_KIND, StructuredPlan
from sls_deploy.pruning.nm.plan import Plan, read_plan_json

NM_METHODS = ("sls", "oneshot", "srste")
CHANNEL_METHODS = ("ssl", "l1", "l1-global", "hybrid")  # hybrid: ssl channels, then 2:4 where the target gains
METHODS = NM_METHODS + CHANNEL_METHODS
# "imported": masks searched elsewhere (`import-sls`), finetuned like any N:M plan; "imported-channels": the kept
# channels of a model pruned by another tool (`import-pruned`), a channel plan of given units
STRATEGIES = {**{m: "nm" for m in NM_METHODS + ("imported",)},
              **{m: "channels" for m in CHANNEL_METHODS + ("imported-channels",)}}


def strategy_of(method: str) -> str:
    try:
        return STRATEGIES[method]
    except KeyError:
        raise BundleError(f"unknown method '{method}' (known: {', '.join(METHODS)})") from None


def load_plan(path: str | os.PathLike) -> Plan | StructuredPlan:
    """plan.json of either strategy (its ``kind`` says which)."""
    raw = read_plan_json(path)
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return (StructuredPlan if kind == STRUCTURED_KIND else Plan).parse(raw, path)
