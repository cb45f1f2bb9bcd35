"""The finetune stage: the pruned model trained from the search's weights -> model.safetensors.

The plan's strategy decides what stays pruned (``Strategy.training``: N:M masks hold pruned weights at exactly
zero, or SR-STE moves them; a narrower channel model has nothing to hold); the modality supplies the batches and the loss. The
steps are what the settings leave after the search (``--steps`` counts search and finetune together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sls_deploy.core import atomic, distributed as dist
from sls_deploy.core.bundle import MASKS, PLAN, WEIGHTS
from sls_deploy.core.checkpoints import read_state_dict, save_weights
from sls_deploy.core.errors import UsageError
from sls_deploy.modalities import registry as modalities
from sls_deploy.pruning.nm import MaskSet
from sls_deploy.pruning.registry import load_plan, strategy_of
from sls_deploy.backends.loading import load_model, plan_widths
from sls_deploy.stages.models import check_plan_indices
from sls_deploy.stages.resume import check_resume
from sls_deploy.stages.skeleton import Run, StageOutput, run_stage
from sls_deploy.training.distill import Controllers, DenseDistill, feature_term, output_term, temporal_term
from sls_deploy.training.loop import TrainConfig, train


def finetune_checkpoint(run: Run) -> Path:
    return run.bundle.work / "finetune.ckpt"


def stored_masks(run: Run) -> MaskSet | None:
    """Masks the search stage stored as they are (imported ones: uneven groups and all-zero layers stay so),
    checked against the manifest; None when the masks follow from weights + plan."""
    bundle = run.bundle
    if MASKS not in bundle.manifest()["stages"]["search"].get("outputs", {}):
        return None
    bundle.verify([MASKS])
    return MaskSet(read_state_dict(bundle.path(MASKS)))


def search_steps(plan) -> int:
    """Training steps the search already spent (sls search, ssl scale learning), counted in ``--steps``."""
    return int(plan.search.get("steps", plan.search.get("ssl_steps", 0)) or 0)


def distillation(run: Run, model) -> DenseDistill | None:
    """The dense model as teacher during finetuning (training/distill.py): its output (--distill-weight), its
    residual stream features (--feature-distill-weight) and, for video, its hidden states (--tf-weight); None when
    every weight is 0."""
    s, recipe, adapter = run.settings, run.recipe, run.recipe.adapter
    terms = ([output_term(s.distill_weight)] if s.distill_weight > 0 else []) \
        + ([feature_term(adapter.feature_modules(model), s.feature_distill_weight)] if s.feature_distill_weight > 0
           else []) \
        + ([temporal_term(adapter.state_modules(model), s.tf_weight)] if s.tf_weight > 0 else [])
    if not terms:
        return None
    base = run.bundle.recorded_file("search", "base_weights")
    return DenseDistill(load_model(recipe, base, device=run.compute.device), terms)


def distill_record(run: Run, model, distill: DenseDistill) -> dict[str, Any]:
    """What the finetune stage's result says of the distillation: each term's weight and last value."""
    s, adapter, last = run.settings, run.recipe.adapter, distill.last
    out: dict[str, Any] = {}
    if s.tf_weight > 0:
        out["tf"] = {"weight": s.tf_weight, "final_term": last.get("temporal finetuning"),
                     "states": list(adapter.state_modules(model))}
    if s.distill_weight > 0 or s.feature_distill_weight > 0:
        out["distill"] = {"output_weight": s.distill_weight, "feature_weight": s.feature_distill_weight,
                          "final_terms": {k: v for k, v in last.items() if k != "temporal finetuning"}}
    return out


def run_finetune(run: Run, resume: bool | None = None, discard: bool = True) -> dict[str, Any]:
    """Finetuning from the search's weights. A checkpoint left by an interrupted run is resumed when ``resume``
    is True (error if it does not match) or None (discarded with a note if it does not match, as ``build``
    does); ``resume=False`` refuses to touch it."""
    s, recipe, bundle = run.settings, run.recipe, run.bundle
    bundle.verify([PLAN])
    plan = load_plan(bundle.path(PLAN))
    init = bundle.recorded_file("search", "init_weights", fallback="base_weights")
    steps = max(0, s.steps - search_steps(plan))
    if steps == 0 and s.steps > 0:  # never silently: --steps counts the search's steps too
        raise UsageError(f"--steps {s.steps} counts the search's steps too, and this bundle's search took "
                         f"{search_steps(plan)}: finetuning would run 0 steps; give --steps {search_steps(plan) + 1} "
                         "or more (finetuning runs the rest), or --steps 0 for none")
    inputs = {"plan": atomic.sha256_file(bundle.path(PLAN)), "init": atomic.sha256_file(init), "steps": steps,
              "sec": recipe.finetune.__dict__, "data": s.data, "seed": s.seed, "modality": s.modality,
              "temporal_weight": s.temporal_weight,
              **{k: getattr(s, k) for k in ("tf_weight", "distill_weight", "feature_distill_weight") if getattr(s, k)}}

    def body(key: str) -> StageOutput:
        ckpt = finetune_checkpoint(run)
        check_resume(ckpt, key, steps, resume, run.log, discard=discard)
        model = load_model(recipe, init, plan_widths(plan), run.compute.device)
        check_plan_indices(model, plan)
        hooks = strategy_of(plan).training(model, plan, stored_masks(run), recipe)  # masks held, SR-STE, nothing
        masks, controller = hooks.masks, hooks.controller
        distill = distillation(run, model)
        if distill is not None:
            controller = Controllers(controller, distill)
        info: dict[str, Any] = {"steps": 0, "resumed_from": 0, "seconds": 0.0, "final_loss": None,
                                "world_size": dist.world_size()}
        if steps > 0 or masks is not None:
            sec = recipe.finetune
            cfg = TrainConfig(steps=steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                              seed=s.seed, amp=run.compute.amp, channels_last=run.compute.channels_last)
            data = modalities.sampler(recipe, s.modality, s.data, s.seed + 1 + 1000 * dist.rank())
            result = train(model, data, cfg, checkpoint=ckpt, resume=True, run_key=key, controller=controller,
                           desc="finetune", progress=run.progress,
                           loss_fn=modalities.loss_fn(s.modality, s.temporal_weight))
            info.update(steps=result.steps_done, resumed_from=result.resumed_from, seconds=round(result.seconds, 1),
                        final_loss=result.final_loss)
            if distill is not None:
                info.update(distill_record(run, model, distill))
        hooks.finish(model)  # the masks applied (SR-STE's final ones: they moved with the weights)
        if s.modality != "image":
            info["temporal_weight"] = s.temporal_weight
        if dist.is_main():
            save_weights(model, bundle.path(WEIGHTS), {"plan": plan.method, "budget": str(plan.budget)})
            if ckpt.exists():
                ckpt.unlink()
        return StageOutput([WEIGHTS], result=info)

    return run_stage(run, "finetune", inputs, body, all_ranks=True)
