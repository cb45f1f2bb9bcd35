"""`import-pruned`: a bundle whose channel plan and starting weights come from a model pruned by another tool.

The pruned model (Torch-Pruning, ModelOpt FastNAS, a plain state dict; ``pruning.channels.pruned_file``) is
matched against the dense weights it was pruned from (``pruning.channels.importing``): the kept units of every
channel group of the adapter. Then the bundle is made the way a nested family member's is: the dense weights
with the pruned ones written in at the kept channels (``imported.shared.safetensors``) and a kept-units file
(``imported.units.json``), from which the search stage slices the narrower model and writes the channel plan
(method ``imported-channels``, budget = the model's MACs ratio). The sliced model computes exactly what the
pruned model computed; ``finetune``, ``export``, ``validate`` and ``engine`` take the bundle as any other.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from sls_deploy.config.recipe import Recipe
from sls_deploy.config.settings import Settings
from sls_deploy.core import atomic
from sls_deploy.core.checkpoints import load_weights, save_weights
from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.channels.importing import MappedChannels, map_kept_channels
from sls_deploy.pruning.channels.plan import StructuredPlan
from sls_deploy.pruning.channels.pruned_file import PrunedFile, read_pruned_file
from sls_deploy.pruning.channels.search import units_record
from sls_deploy.pruning.macs import layer_macs
from sls_deploy.stages.build import search_or_release, start
from sls_deploy.backends.loading import load_model, model_config, resolve_base_weights
from sls_deploy.stages.skeleton import Log

IMPORTED_METHOD = "imported-channels"  # a channel plan from outside: no selection, no search
IMPORTED_SHARED = "imported.shared.safetensors"  # the dense weights with the pruned ones written in
IMPORTED_UNITS = "imported.units.json"  # the kept units per group (the search stage's given units)


@dataclass
class ImportResult:
    plan: StructuredPlan
    source: PrunedFile
    mapped: MappedChannels


def run_import_pruned(recipe: Recipe, source: Path, out: Path, weights: str | None, log: Log = print,
                      progress: bool = True) -> ImportResult:
    """Map ``source`` onto the recipe's channel groups and write the bundle ``out`` (nothing is written when the
    file, the dense weights or the mapping is refused)."""
    pruned = read_pruned_file(source)
    base = resolve_base_weights(recipe, weights)
    dense = load_model(recipe, base)
    groups = recipe.adapter.channel_groups(dense)
    if not groups:
        raise PlanError(f"{recipe.describe_model()} declares no channel groups: nothing to import channels into")
    mapped = map_kept_channels(dense, groups, pruned.state)
    narrow = recipe.adapter.build(model_config(recipe, mapped.widths))
    load_weights(narrow, mapped.state, f"{recipe.describe_model()} at the imported widths")
    h, w = recipe.reference_input_hw()
    example = recipe.adapter.example_input(recipe.model, h, w)
    ratio = (sum(layer_macs(recipe.adapter.export_module(narrow), example).values())
             / sum(layer_macs(recipe.adapter.export_module(dense), example).values()))
    budget = min(1.0, math.ceil(ratio * 1e4) / 1e4)  # the plan's ratio, rounded up: within its own budget
    units_path = (out / IMPORTED_UNITS).resolve()
    settings = Settings.resolve(recipe, budget=budget, method=IMPORTED_METHOD, weights=weights, units=str(units_path))
    run = start(recipe, settings, out, log, progress)
    try:
        shared_path = run.bundle.path(IMPORTED_SHARED)
        dense.load_state_dict(mapped.shared)
        save_weights(dense, shared_path, {"source": str(source), "tool": pruned.tool})
        atomic.write_json(units_path, {**units_record(shared_path, mapped.keep), "source": str(Path(source).resolve()),
                                       "source_sha256": atomic.sha256_file(source), "tool": pruned.tool,
                                       "reordered_groups": mapped.reordered,
                                       "worst_relative_distance": mapped.worst})
    except BaseException:
        if run.created_here:
            shutil.rmtree(run.bundle.root, ignore_errors=True)
        raise
    return ImportResult(search_or_release(run), pruned, mapped)
