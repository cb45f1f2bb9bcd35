"""The build: search -> finetune -> export -> validate into one bundle, for any strategy and modality.

``start`` claims the bundle for the resolved settings (stored whole in the manifest); ``reopen`` restores them
for a stage run on an existing bundle. Finished stages are skipped on a re-run; an interrupted search or
finetune resumes from its checkpoint. Under torchrun every rank searches and finetunes; rank 0 alone writes
files, exports and validates.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from sls_deploy.config.recipe import Recipe, load_recipe
from sls_deploy.config.settings import Settings
from sls_deploy.core import distributed as dist
from sls_deploy.core.bundle import RECIPE, Bundle
from sls_deploy.core.device import Compute, resolve_compute
from sls_deploy.core.errors import BundleError
from sls_deploy.core.memory import release_between_stages
from sls_deploy.modalities import registry as modalities
from sls_deploy.pruning.registry import strategy_of
from sls_deploy.stages.export import run_export
from sls_deploy.stages.finetune import run_finetune
from sls_deploy.backends.loading import load_model, resolve_base_weights
from sls_deploy.stages.search import run_search
from sls_deploy.stages.skeleton import Log, Run
from sls_deploy.stages.validate import run_validate


def default_out(model_name: str, budget: float) -> Path:
    return Path("runs") / f"{model_name}-b{budget:.2f}"


def start(recipe: Recipe, settings: Settings, out: Path, log: Log = print, progress: bool = True,
          compute: Compute | None = None) -> Run:
    """Claim ``out`` for this build (a folder holding another build is refused) and return the run.
    ``compute``: where PyTorch runs (None: the recipe's compute section, resolved here)."""
    # before anything is written: the device exists, data folders exist, the base weights load onto the model
    compute = compute or resolve_compute(recipe.compute)
    for spec in (settings.data, settings.eval_data):
        modalities.resolve_data(settings.modality, spec)
    load_model(recipe, resolve_base_weights(recipe, settings.weights))
    bundle = Bundle(out)
    created = not out.exists()
    if dist.is_main():
        bundle.check_claimable(settings.build_key(recipe))  # before the lock file is created in the folder
        bundle.lock()
        try:
            bundle.claim(settings.build_key(recipe), Path(recipe.path).read_text(), settings.to_record())
        except BaseException:
            if created:  # nothing of ours may stay behind a refused claim
                shutil.rmtree(out, ignore_errors=True)
            raise
    dist.barrier()
    return Run(bundle, recipe, settings, log if dist.is_main() else (lambda msg: None), progress, created, compute)


def search_or_release(run: Run):
    """The search stage; if it fails before anything was planned in a folder this run created (an unreachable
    budget, ...), the folder goes again, so the corrected command is not refused as "another bundle". A folder
    holding a training checkpoint (a search stopped by Ctrl-C or out of device memory) stays: it resumes."""
    try:
        return run_search(run)
    except BaseException:
        stages = run.bundle.manifest().get("stages", {}) if run.bundle.root.is_dir() else {}
        resumable = run.bundle.work.is_dir() and any(run.bundle.work.glob("*.ckpt"))
        if run.created_here and not stages and not resumable and dist.is_main():
            shutil.rmtree(run.bundle.root, ignore_errors=True)
        raise


def reopen(root: Path, log: Log = print, progress: bool = True, compute: dict | None = None, **overrides) -> Run:
    """An existing bundle with the settings it was built with (``overrides``: a later stage's options).
    ``compute``: for a stage that runs PyTorch, the --device / --amp / --channels-last given ({} for none) on top
    of the bundle recipe's compute section, checked before the folder is locked; None: the CPU (export, pack)."""
    bundle = Bundle(root)
    m = bundle.require()
    bundle.verify([RECIPE])  # as `build` wrote it: an edited recipe.yaml is refused, not silently used
    recipe = load_recipe(bundle.path(RECIPE))
    resolved = resolve_compute(recipe.compute, **compute) if compute is not None else Compute()
    if dist.is_main():
        bundle.lock()  # a stage command writes into the folder
    record = m.get("options")
    if not isinstance(record, dict) or "strategy" not in record:
        raise BundleError(f"{root} was made by an older sls-deploy (its manifest has no settings record); "
                          "build it again")
    settings = Settings.from_record(record, recipe).with_overrides(recipe, **overrides)
    return Run(bundle, recipe, settings, log, progress, compute=resolved)


def plan_line(plan, modality: str = "image") -> str:
    return strategy_of(plan).plan_line(plan, f"per {modalities.lookup(modality).unit}")


def build(run: Run) -> dict:
    """All stages; returns report.json's dict (empty on a non-zero torchrun rank)."""
    stages: list[tuple[str, Callable[[], object]]] = [
        ("search", lambda: search_or_release(run)), ("finetune", lambda: run_finetune(run)),
        ("export", lambda: run_export(run)), ("validate", lambda: run_validate(run))]
    t_all, rep = time.perf_counter(), {}
    for i, (name, fn) in enumerate(stages, 1):
        if name in ("export", "validate") and not dist.is_main():
            return {}
        t0 = time.perf_counter()
        run.log(f"[{i}/{len(stages)}] {name} ...")
        result = fn()
        if name == "search":
            run.log(plan_line(result, run.settings.modality))
        if name == "validate":
            rep = result
        run.log(f"  {name} done in {time.perf_counter() - t0:.1f}s")
        release_between_stages()
    run.log(f"build finished in {time.perf_counter() - t_all:.1f}s -> {run.bundle.root}")
    return rep


def build_bundle(recipe: Recipe, out: Path, *, budget: float, method: str | None = None, log: Log = print,
                 progress: bool = True, compute: Compute | None = None, **cli) -> dict:
    """``sls-deploy build`` as a function (benchmarks, tests): resolve the settings, claim ``out``, build."""
    settings = Settings.resolve(recipe, budget=budget, method=method, **cli)
    return build(start(recipe, settings, out, log, progress, compute))
