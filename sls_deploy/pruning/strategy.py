"""The pruning strategy contract: one class per method, owning everything the stages would otherwise switch on.

Modelled on ModelOpt's mode descriptors (one class per mode owning its config, its conversion and its restore):
a ``Strategy`` owns

- its search: ``search_inputs`` (what the search stage's cache key adds) and ``search(ctx) -> plan``, with the
  stage's services handed in through a ``SearchContext`` (no stage internals);
- its training hooks: ``training(model, plan, stored_masks)`` -> ``TrainingHooks`` (masks held at zero, SR-STE,
  nothing for a narrower model);
- its graph checks after export: ``dense_reference`` (compare against the dense graph), ``nm_part(plan)``
  (patterns every graph must still show), ``fp32_islands(plan)``;
- its report lines: ``plan_line``, ``search_line``, ``plan_rows``, ``report_widths``.

The settings checks (options of the other family, --lam only for SLS, --selection only for learned scales) are
read from the method groups of ``core.vocabulary``, which ``config/`` checks without importing this package; each
strategy class declares the same facts (tests/test_strategies.py checks they agree). ``pruning.registry`` maps
method names and plans to strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

SEARCH_WEIGHTS = "search.safetensors"  # the weights finetuning starts from (sls-searched or sliced)


@dataclass
class SearchContext:
    """What a strategy's search may use: the resolved settings and recipe, the base weights, and the stage's
    services as callables (loading and building models, data, training, writing bundle files)."""

    settings: Any  # config.settings.Settings
    recipe: Any  # config.recipe.Recipe
    base: Path  # the dense base weights
    key: str  # the search stage's cache key (checkpoints resume only under the same key)
    work: Path  # the bundle's work folder (search checkpoints)
    device: Any
    log: Callable[[str], None]
    progress: bool
    load_model: Callable[..., torch.nn.Module]  # (weights, widths=None, device=None) -> model
    build_model: Callable[[dict | None], torch.nn.Module]  # widths -> a fresh model of those widths
    fp32_islands: Callable[[torch.nn.Module], list]  # the recipe's FP32 islands of a model
    sampler: Callable[[int], Any]  # seed -> the modality's training batches
    loss_fn: Callable[[], Any]  # the modality's training loss (None: the default L1)
    frames_per_run: Callable[[Any], int]  # an example input -> frames one graph run covers
    train: Callable[..., Any]  # (model, data, *, steps, lr, controller, checkpoint, desc, loss_fn, **cfg) -> result
    check_resume: Callable[..., None]  # (checkpoint, steps, what) -> None: a stale checkpoint is refused or removed
    save_weights: Callable[[torch.nn.Module, str, dict], None]  # (model, bundle file name, metadata)
    path: Callable[[str], Path]  # a bundle file's path
    save_plan: Callable[[Any], None]  # writes plan.json
    files: list[str] = field(default_factory=list)  # bundle files the search wrote (besides plan.json)
    init: Path | None = None  # the weights finetuning starts from (None: the base)

    def layer_precision(self, name: str, islands) -> str:
        """A layer's precision in the deployed graphs: "fp32" for an FP32 island or when only FP32 graphs are
        made."""
        return "fp32" if name in islands or not set(self.settings.precisions) & {"fp16", "int8"} else "fp16/int8"


@dataclass
class TrainingHooks:
    """What finetuning does for a plan: ``masks`` held on the weights (None: nothing to hold), the training
    ``controller`` (the masks themselves, SR-STE, or None), and ``finish(model)`` after the last step."""

    masks: Any = None
    controller: Any = None
    final_masks: Callable[[torch.nn.Module], Any] | None = None  # masks recomputed after training (SR-STE)

    def finish(self, model: torch.nn.Module) -> None:
        if self.masks is None:
            return
        masks = self.final_masks(model) if self.final_masks is not None else self.masks
        masks.apply(model)  # steps == 0: the one-shot pruned model itself


class Strategy:
    """One pruning method. Subclasses set ``name`` and ``family`` and the method facts, and implement the
    hooks; the defaults here are those of a plan with nothing to search, hold or check."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "nm" (masks on weights) | "channels" (units removed, layers sliced)
    searches_sls: ClassVar[bool] = False  # core.vocabulary.SLS_SEARCH
    learns_scales: ClassVar[bool] = False  # core.vocabulary.LEARNED_SCALES
    has_nm_part: ClassVar[bool] = False  # core.vocabulary.WITH_NM_PART
    uniform_widths: ClassVar[bool] = False  # core.vocabulary.UNIFORM_WIDTHS
    dense_reference: ClassVar[bool] = False  # export compares the graph with the dense model's
    user_method: ClassVar[bool] = True  # a --method choice (False: plans made by an import command)

    # -- search ---------------------------------------------------------------------------------------------
    def short_steps_note(self, s, allowed: int, need: int) -> str:
        return f"{s.method}'s search phase takes {allowed} steps instead of {need} (structured.ssl_steps)"

    def search_inputs(self, s, recipe, allowed: int) -> dict[str, Any]:
        """What the search's cache key holds besides the common inputs."""
        return {}

    def search(self, ctx: SearchContext):
        raise NotImplementedError(f"{self.name} plans are made by an import command, not searched")

    # -- finetune -------------------------------------------------------------------------------------------
    def training(self, model: torch.nn.Module, plan, stored_masks, recipe) -> TrainingHooks:
        return TrainingHooks()

    # -- export ---------------------------------------------------------------------------------------------
    def nm_part(self, plan):
        """The N:M plan every graph must still show (None: no patterns)."""
        return None

    def fp32_islands(self, plan) -> list | None:
        """The FP32 islands the plan recorded (None: the recipe's, from the model)."""
        return None

    # -- reports --------------------------------------------------------------------------------------------
    def plan_line(self, plan, per: str) -> str:
        raise NotImplementedError

    def search_line(self, plan) -> str:
        raise NotImplementedError

    def plan_rows(self, plan) -> list[dict]:
        raise NotImplementedError

    def report_widths(self, plan) -> tuple[list[dict], dict[str, int]]:
        """The report's (groups, widths) of a channel plan; empty for N:M."""
        return [], {}
