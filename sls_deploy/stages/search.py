"""The search stage: the plan under the budget, for any strategy on any modality -> plan.json.

The method's strategy (``pruning.registry``) searches: N:M methods plan N per layer (sls trains while it searches
and hands its weights on), channel methods select the kept units of the adapter's channel groups and slice the
narrower model (``search.safetensors``). This stage gives the strategy its services through a
``pruning.strategy.SearchContext`` (models, the modality's batches and loss, training, bundle files) and records
what it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sls_deploy.core import atomic
from sls_deploy.core.bundle import PLAN
from sls_deploy.core.checkpoints import save_weights
from sls_deploy.modalities import registry as modalities
from sls_deploy.pruning.registry import load_plan, strategy_for
from sls_deploy.pruning.strategy import SEARCH_WEIGHTS, SearchContext
from sls_deploy.backends.loading import load_model, model_config, resolve_base_weights
from sls_deploy.stages.models import fp32_islands
from sls_deploy.stages.resume import check_resume
from sls_deploy.stages.skeleton import Run, StageOutput, run_stage
from sls_deploy.training.loop import TrainConfig, train

__all__ = ["SEARCH_WEIGHTS", "run_search"]


def run_search(run: Run):
    s, recipe = run.settings, run.recipe
    strategy = strategy_for(s.method)
    base = resolve_base_weights(recipe, s.weights)
    inputs: dict[str, Any] = {"key": s.build_key(recipe), "base": atomic.sha256_file(base) if base.is_file() else None,
                              "ref": recipe.reference_output, "model": recipe.model.options, "seed": s.seed,
                              "modality": s.modality}
    allowed, need = s.search_phase(recipe)
    if allowed < need and s.steps > 0:
        run.log(f"  --steps {s.steps} is short: {strategy.short_steps_note(s, allowed, need)}, so that finetuning "
                f"gets at least {s.steps - allowed} (a quarter of --steps)")
    inputs.update(strategy.search_inputs(s, recipe, allowed))
    run_stage(run, "search", inputs, lambda key: _body(run, strategy, base, key), all_ranks=True)
    return load_plan(run.bundle.path(PLAN))


def _record(base: Path, init: Path) -> dict[str, Any]:
    """The search's record of its weights: the base by absolute path (it lives outside the bundle), the weights
    finetuning starts from (a bundle file is looked up in the bundle wherever it moves: ``Bundle.recorded_file``)."""
    base = Path(base).resolve()
    init = base if Path(init).resolve() == base else init
    return {"base_weights": str(base), "base_weights_sha256": atomic.sha256_file(base), "init_weights": str(init)}


def search_context(run: Run, base: Path, key: str) -> SearchContext:
    """The stage's services for a strategy's search."""
    s, recipe, bundle = run.settings, run.recipe, run.bundle

    def train_fn(model, data, *, checkpoint, controller, desc, loss_fn=None, **config):
        cfg = TrainConfig(**config, seed=s.seed, amp=run.compute.amp, channels_last=run.compute.channels_last)
        return train(model, data, cfg, checkpoint=checkpoint, resume=True, run_key=key, controller=controller,
                     desc=desc, progress=run.progress, loss_fn=loss_fn)

    return SearchContext(
        settings=s, recipe=recipe, base=base, key=key, work=bundle.work, device=run.compute.device, log=run.log,
        progress=run.progress,
        load_model=lambda weights, widths=None, device=None: load_model(recipe, weights, widths, device),
        build_model=lambda widths: recipe.adapter.build(model_config(recipe, widths)),
        fp32_islands=lambda model: fp32_islands(recipe, model),
        sampler=lambda seed: modalities.sampler(recipe, s.modality, s.data, seed),
        loss_fn=lambda: modalities.loss_fn(s.modality, s.temporal_weight),
        frames_per_run=modalities.frames_per_run, train=train_fn,
        check_resume=lambda ckpt, steps, what: check_resume(ckpt, key, steps, None, run.log, what=what),
        save_weights=lambda model, name, meta: save_weights(model, bundle.path(name), meta),
        save_plan=lambda plan: plan.save(bundle.path(PLAN)), path=bundle.path)


def _body(run: Run, strategy, base: Path, key: str) -> StageOutput:
    ctx = search_context(run, base, key)
    strategy.search(ctx)
    return StageOutput([PLAN] + ctx.files, extra=_record(base, ctx.init or base))
