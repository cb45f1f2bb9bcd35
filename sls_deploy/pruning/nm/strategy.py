"""The N:M strategies: masks on the weights of the dense architecture (sls, oneshot, srste, imported).

Search: per-layer N of M over the adapter's prunable layers (``sls`` trains while it searches and hands its
weights on; ``oneshot``/``srste`` plan a uniform N). Finetuning holds the masks (SR-STE lets them move and takes
the final ones). Every graph must still show every planned pattern.
"""

from __future__ import annotations

from typing import Any

import torch

from sls_deploy.core import distributed as dist
from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.nm.masking import MaskSet
from sls_deploy.pruning.nm.patterns import nm_mask
from sls_deploy.pruning.nm.plan import Plan
from sls_deploy.pruning.nm.search import plan_uniform, search_sls, split_layers
from sls_deploy.pruning.nm.srste import SRSTE
from sls_deploy.pruning.strategy import SEARCH_WEIGHTS, SearchContext, Strategy, TrainingHooks


def masks_for(model: torch.nn.Module, plan: Plan) -> MaskSet:
    """Masks follow from the weights and the plan: top-N |w| in each group of M input channels."""
    modules = dict(model.named_modules())
    unknown = [l.name for l in plan.layers if l.name not in modules]
    if unknown:
        raise PlanError(f"plan.json names layer '{unknown[0]}', which the model does not have")
    return MaskSet({l.name: nm_mask(modules[l.name].weight, l.n, l.m) for l in plan.layers if l.n < l.m})


class NMStrategy(Strategy):
    """A plan of N per layer; the base of every N:M method."""

    family = "nm"

    def search_inputs(self, s, recipe, allowed: int) -> dict[str, Any]:
        return {"n": s.n, "target": s.target}

    def search(self, ctx: SearchContext) -> Plan:
        s, recipe = ctx.settings, ctx.recipe
        model = ctx.load_model(ctx.base, device=ctx.device)
        islands = ctx.fp32_islands(model)
        split = split_layers(recipe, model, s.m, s.target, {l.name: ctx.layer_precision(l.name, islands)
                                                           for l in recipe.adapter.layers(model)})
        plan = self.plan(ctx, model, split)
        plan.seed = s.seed
        plan.target = s.target
        plan.fp32_islands = islands
        for layer in plan.layers:
            layer.precision = ctx.layer_precision(layer.name, islands)
        if plan.target_ratio > s.budget * (1 + 1e-9):
            raise PlanError(f"the plan's cost on --target {s.target} ({plan.target_ratio:.4f}) exceeds the budget "
                            f"{s.budget:g}")
        plan.search["world_size"] = dist.world_size()
        if dist.is_main():
            ctx.save_plan(plan)
        return plan

    def plan(self, ctx: SearchContext, model, split) -> Plan:
        s = ctx.settings
        return plan_uniform(ctx.recipe, split, s.budget, s.m, s.method, n=s.n)

    def training(self, model, plan, stored_masks, recipe) -> TrainingHooks:
        masks = stored_masks or masks_for(model, plan)
        return TrainingHooks(masks=masks, controller=masks)

    def nm_part(self, plan):
        return plan

    def fp32_islands(self, plan) -> list | None:
        return plan.fp32_islands

    def plan_line(self, plan, per: str) -> str:
        ns = sorted({l.n for l in plan.layers})
        return (f"  plan: {plan.method}, N in {ns} of M={plan.m} over {len(plan.layers)} layers, "
                f"MACs {plan.macs_pruned / 1e9:.2f} / {plan.macs_dense / 1e9:.2f} G per graph run (ratio {plan.ratio:.3f})")

    def search_line(self, plan) -> str:
        ns = sorted({l.n for l in plan.layers})
        return (f"{plan.method}, {len(plan.layers)} layers at N in {ns} of M={plan.m}, "
                f"MACs ratio {plan.ratio:.3f}, cost on --target {plan.target} {plan.target_ratio:.3f}")

    def plan_rows(self, plan) -> list[dict]:
        return [{"name": l.name, "weight_shape": l.weight_shape, "n": l.n, "m": l.m, "sparse_2to4": l.sparse_2to4,
                 "precision": l.precision, "macs_dense": l.macs_dense, "macs_pruned": l.macs_pruned}
                for l in plan.layers]


class OneShot(NMStrategy):
    """Uniform N by magnitude, the SLS paper's one-shot baseline."""

    name = "oneshot"


class SrSte(NMStrategy):
    """The uniform plan, finetuned with SR-STE: the masks move with the weights; the final ones are kept."""

    name = "srste"

    def training(self, model, plan, stored_masks, recipe) -> TrainingHooks:
        masks = stored_masks or masks_for(model, plan)
        return TrainingHooks(masks=masks, final_masks=lambda m: masks_for(m, plan),
                             controller=SRSTE([(l.name, l.n) for l in plan.layers if l.n < l.m], plan.m,
                                              recipe.srste_decay))


class Sls(NMStrategy):
    """The SLS search: per-layer N from trained gates; its trained weights are where finetuning starts."""

    name = "sls"
    searches_sls = True

    def short_steps_note(self, s, allowed: int, need: int) -> str:
        return f"the SLS search may take at most {allowed} steps instead of {need} (sls.max_search_steps)"

    def search_inputs(self, s, recipe, allowed: int) -> dict[str, Any]:
        return {**super().search_inputs(s, recipe, allowed), "sls": s.sls(recipe).__dict__, "max": allowed,
                "data": s.data, "ft": recipe.finetune.__dict__}

    def plan(self, ctx: SearchContext, model, split) -> Plan:
        s, recipe = ctx.settings, ctx.recipe
        data = ctx.sampler(s.seed + 1000 * dist.rank())
        ckpt = ctx.work / "search.ckpt"
        plan, _ = search_sls(recipe, model, split, s.budget, s.sls(recipe), data,
                             max_steps=s.search_phase(recipe)[0], lr=recipe.finetune.lr,
                             train=lambda *a, **kw: ctx.train(*a, checkpoint=ckpt, **kw), seed=s.seed)
        plans = dist.gather([(l.name, l.n) for l in plan.layers])
        if any(p != plans[0] for p in plans):
            raise PlanError("the ranks of this torchrun job found different plans (non-deterministic search?)")
        if dist.is_main():
            ctx.save_weights(model, SEARCH_WEIGHTS, {"plan": "sls"})
            if ckpt.exists():
                ckpt.unlink()
        ctx.files.append(SEARCH_WEIGHTS)
        ctx.init = ctx.path(SEARCH_WEIGHTS)
        return plan


class Imported(NMStrategy):
    """Masks searched elsewhere (`import-sls`), finetuned like any N:M plan."""

    name = "imported"
    user_method = False
