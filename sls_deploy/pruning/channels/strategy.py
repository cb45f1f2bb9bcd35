"""The channel strategies: units removed and the layers sliced (ssl, l1, l1-global, hybrid, imported-channels).

Every one searches through ``channels.search`` (measure, select, slice, record) and differs in how it selects
the kept units (``select``); a nested family member's given units replace the selection for any of them.
Finetuning has nothing to hold on a narrower model (a hybrid plan holds the masks of its 2:4 part); export
compares the graph with the dense model's (plain narrower convs, RSC gathers/scatters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sls_deploy.core import atomic, distributed as dist
from sls_deploy.core.errors import UsageError
from sls_deploy.pruning.channels import search as cs
from sls_deploy.pruning.channels.selection import select_global, select_uniform
from sls_deploy.pruning.hybrid import HybridPart
from sls_deploy.pruning.nm.strategy import masks_for
from sls_deploy.pruning.strategy import SearchContext, Strategy, TrainingHooks


class ChannelStrategy(Strategy):
    """A plan of kept units per channel group; the base of every channel method."""

    family = "channels"
    dense_reference = True

    def search_inputs(self, s, recipe, allowed: int) -> dict[str, Any]:
        if dist.world_size() > 1:
            raise UsageError("channel pruning runs in one process (no torchrun)")
        inputs: dict[str, Any] = {}
        if s.units:
            inputs["units"] = atomic.sha256_file(Path(s.units)) if Path(s.units).is_file() else s.units
        inputs.update(round_to=s.round_to, **({"keep_full": sorted(s.keep_full)} if s.keep_full else {}),
                      **({"selection": s.selection} if s.selection != "normalised" else {}))
        return inputs

    def search(self, ctx: SearchContext):
        s = ctx.settings
        m = cs.measured(ctx)
        if m.given:
            keep = cs.given_units(m.given[1], Path(s.units), m.groups, m.costs.units, m.full)
            m.info.update(shared_weights=str(m.given[0]), importance="none (the units are given)",
                          selection=self.given_selection(Path(s.units).name))
        else:
            keep = self.select(ctx, m)
        plan, sliced = cs.finish(ctx, m, keep)
        self.complete(ctx, m, plan)
        cs.save(ctx, plan, sliced)
        return plan

    def given_selection(self, units_file: str) -> str:
        """The report's selection line when the kept units are given (a nested family member's)."""
        return f"given: the kept units of a nested family member ({units_file}), one ranking shared by every member"

    def select(self, ctx: SearchContext, m: cs.Measured) -> dict:
        raise NotImplementedError(f"{self.name} plans are given, not searched")

    def complete(self, ctx: SearchContext, m: cs.Measured, plan) -> None:
        """What the plan gets after slicing (a hybrid plan: its 2:4 part)."""

    def training(self, model, plan, stored_masks, recipe) -> TrainingHooks:
        nm = plan.nm_plan  # a hybrid channel plan has an N:M part
        masks = stored_masks or (masks_for(model, nm) if nm is not None else None)
        return TrainingHooks(masks=masks, controller=masks)

    def nm_part(self, plan):
        return plan.nm_plan

    def plan_line(self, plan, per: str) -> str:
        narrowed = [g for g in plan.groups if g.kept_units < g.dense_units]
        return (f"  plan: {plan.method}, {len(narrowed)} of {len(plan.groups)} channel groups narrowed, MACs "
                f"{plan.macs_pruned / plan.frames / 1e9:.2f} / {plan.macs_dense / plan.frames / 1e9:.2f} G {per} "
                f"(ratio {plan.ratio:.3f})")

    def search_line(self, plan) -> str:
        return (f"{plan.method}, widths "
                f"{', '.join(f'{g.name}={g.kept_units}/{g.dense_units}' for g in plan.groups)}, "
                f"MACs ratio {plan.ratio:.3f}, cost on --target {plan.target} {plan.target_ratio:.3f}"
                + (f", {len(plan.nm_layers)} layers at 2:4" if plan.nm_layers else ""))

    def plan_rows(self, plan) -> list[dict]:
        return [{"name": l.name, "macs_dense": l.macs_dense, "macs_pruned": l.macs_pruned,
                 "out_group": l.out_group, "in_group": l.in_group} for l in plan.layers]

    def report_widths(self, plan) -> tuple[list[dict], dict[str, int]]:
        return [{k: v for k, v in g.to_json().items() if k != "kept"} for g in plan.groups], plan.widths


class L1(ChannelStrategy):
    """The same kept fraction in every group by filter L1 norm (the uniform baseline)."""

    name = "l1"
    uniform_widths = True

    def select(self, ctx: SearchContext, m: cs.Measured) -> dict:
        s = ctx.settings
        m.info["selection"] = ("uniform kept fraction in every group; what rounding left of the budget is spent "
                               "widening the groups whose next units have the largest normalised L1 norm")
        return select_uniform(m.l1, m.costs, s.budget, s.round_to, fill=True)


class L1Global(ChannelStrategy):
    """One global threshold on the per-group normalised L1 norms."""

    name = "l1-global"

    def select(self, ctx: SearchContext, m: cs.Measured) -> dict:
        s = ctx.settings
        keep = select_global(m.l1, m.costs, s.budget, s.round_to)
        m.info["selection"] = "one global threshold on per-group normalised importance"
        return keep


class Ssl(ChannelStrategy):
    """Learned per-unit scales (SSL/ASSL): the units below the budget's threshold of a ranking (the filter L1
    norm, or the ``--selection`` criterion) are driven to 0 by a growing penalty while everything trains; then
    one global threshold on |scale| (or, for a criterion on the loss's scale, the ranking's own marks)."""

    name = "ssl"
    learns_scales = True

    def search_inputs(self, s, recipe, allowed: int) -> dict[str, Any]:
        return {**super().search_inputs(s, recipe, allowed), "ssl": s.structured(recipe).__dict__, "data": s.data,
                "ft": recipe.finetune.__dict__, "target": s.target, "precisions": list(s.precisions)}

    def hybrid(self, ctx: SearchContext, m: cs.Measured, normalize: bool) -> HybridPart | None:
        return None

    def select(self, ctx: SearchContext, m: cs.Measured) -> dict:
        s = ctx.settings
        rank, criterion = cs.unit_ranking(s, m.model, m.groups, m.costs, m.full, ctx.sampler, ctx.loss_fn())
        normalize = criterion.normalize
        hybrid = m.hybrid = self.hybrid(ctx, m, normalize)
        budget = m.budget = hybrid.channel_budget(rank) if hybrid else s.budget
        marks = select_global(rank, m.costs, budget, s.round_to, normalize=normalize)  # an unreachable budget fails
        scales, ssl_info = cs.learned_scales(ctx, m.model, m.groups, marks)
        m.info.update(ssl_info)
        if not normalize:  # a criterion on the loss's scale: the growing penalty drove exactly the others to 0
            keep = marks
            m.info.update(criterion.info)
        else:
            learned = {k: v for k, v in scales.folded.items() if k in m.l1}
            if hybrid:
                budget = m.budget = hybrid.channel_budget(learned)
            keep = select_global(learned, m.costs, budget, s.round_to, normalize=s.selection == "normalised")
        if s.selection == "raw":
            m.info["selection"] = "one global threshold on the raw |scale| of every unit (SSL's public code)"
        m.info["kept_marked_units"] = {g: len(set(keep[g].tolist()) - set(marks[g].tolist())) for g in keep}
        return keep


class Hybrid(Ssl):
    """ssl channels, then 2:4 on the layers of the narrower model the target accelerates, the channel budget
    raised as far as the whole plan stays within the budget (``pruning.hybrid``)."""

    name = "hybrid"
    has_nm_part = True

    def hybrid(self, ctx: SearchContext, m: cs.Measured, normalize: bool) -> HybridPart | None:
        return HybridPart(ctx, m.model, m.costs, normalize=normalize)

    def complete(self, ctx: SearchContext, m: cs.Measured, plan) -> None:
        if m.given:  # not reached: Settings refuse given units for a plan with an N:M part
            return
        plan.nm_layers = m.hybrid.nm_layers(m.widths)
        plan.search["hybrid"] = m.hybrid.describe(plan, m.budget)
        plan.validate()


class ImportedChannels(ChannelStrategy):
    """A channel plan made elsewhere (`import-pruned`: Torch-Pruning or ModelOpt models): nothing to search;
    finetuned, exported and validated like any channel plan."""

    name = "imported-channels"
    user_method = False

    def given_selection(self, units_file: str) -> str:
        return f"imported: the kept channels of a model pruned by another tool ({units_file})"
