"""The one stage skeleton: digest the inputs, skip a stage whose inputs and outputs are current, otherwise run
it, then record its outputs (sha256) and result in the manifest. Every stage of every strategy and modality
goes through ``run_stage``, so skipping, resuming and recording behave the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sls_deploy.config.recipe import Recipe
from sls_deploy.config.settings import Settings
from sls_deploy.core import distributed as dist
from sls_deploy.core.bundle import Bundle, digest
from sls_deploy.core.device import Compute

Log = Callable[[str], None]


@dataclass
class Run:
    """What every stage is given: the bundle, its recipe and its settings, and how to talk to the user."""

    bundle: Bundle
    recipe: Recipe
    settings: Settings
    log: Log = field(default=print, repr=False)
    progress: bool = True
    created_here: bool = False  # this run created the bundle folder (so it may remove it if nothing got planned)
    compute: Compute = field(default_factory=Compute)  # where PyTorch runs (device, AMP); the CPU by default


@dataclass
class StageOutput:
    files: list[str]  # bundle files this run wrote (their sha256 go into the manifest)
    result: dict[str, Any] = field(default_factory=dict)  # what the stage reports (manifest "result")
    extra: dict[str, Any] = field(default_factory=dict)  # other manifest fields of the stage


def run_stage(run: Run, name: str, inputs: dict[str, Any], body: Callable[[str], StageOutput],
              all_ranks: bool = False) -> dict[str, Any]:
    """``body(inputs_digest)`` unless the stage is current; returns the stage's recorded result.

    ``all_ranks``: under torchrun every rank runs ``body`` (search, finetune: the training stages, whose record
    also says where they trained: ``compute``, device name, torch/CUDA versions, AMP mode) and waits for rank 0
    to record; other stages run on rank 0 alone."""
    key = digest(inputs)
    if run.bundle.stage_is_current(name, key):
        run.log("  up to date")
        return run.bundle.manifest()["stages"][name].get("result", {})
    t0 = time.perf_counter()
    out = body(key)
    if dist.is_main():
        compute = {"compute": run.compute.record()} if all_ranks else {}
        run.bundle.record_stage(name, key, out.files, time.perf_counter() - t0,
                                {"result": out.result, **compute, **out.extra})
    if all_ranks:
        dist.barrier()
    return out.result
