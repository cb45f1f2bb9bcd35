"""Settings: the recipe and the command line resolved once into one frozen object.

Every stage reads its knobs from ``Settings`` (never ``opts.x or recipe.y``); the manifest stores the record
whole (``to_record``) and later stages restore it whole (``from_record``), so a `finetune` or `export` run on
an existing bundle uses exactly what `build` or `search` resolved. Per-stage overrides (`finetune --steps`,
`export --precision`, `validate --eval-data`) go through ``with_overrides`` and are checked the same way.

Two independent axes are chosen here: the pruning *strategy* (``nm``: sls / oneshot / srste, masks on weights;
``channels``: ssl / l1 / l1-global, units removed and the graph sliced), from the method, and the *modality*
(``image``, ``clip``, ``step``), from the recipe (``model.modality``) or the adapter's default.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sls_deploy.config.recipe import Recipe
from sls_deploy.core.errors import UsageError
from sls_deploy.core.vocabulary import (CALIB_METHODS, DEFAULT_CALIB_METHOD, DEFAULT_SELECTION, FAMILY_OF,
                                        FAMILY_OPTIONS, IO_DTYPES, LEARNED_SCALES, METHODS, NM_METHODS, PRECISIONS,
                                        SELECTIONS, SLS_SEARCH, TARGETS, WITH_NM_PART)

VALID_M = (4, 8, 16, 32)


@dataclass(frozen=True)
class Settings:
    budget: float
    method: str
    strategy: str  # "nm" | "channels" (from the method)
    modality: str  # "image" | "clip" | "step" (from the recipe / adapter)
    seed: int = 0
    steps: int = 0  # training steps after the base model, search and finetune together, for every method
    data: str = ""  # training data (images or clips)
    eval_data: str = ""
    weights: str | None = None  # dense base weights; None: the recipe's shipped weights
    # N:M
    m: int = 4
    n: int | None = None  # oneshot/srste: a fixed uniform N
    lam: float | None = None  # SLS lambda; None: the recipe's
    alpha: float | None = None
    target: str = "trt"  # what the budget is counted on (pruning/target.py): trt | ort | none
    # channels
    round_to: int = 8
    keep_full: tuple[str, ...] = ()  # channel groups kept at full width
    selection: str = "normalised"  # ssl's final selection: one threshold on per-group normalised |scale| or raw
    units: str | None = None  # a JSON file of kept units per group (a nested family's member): no selection
    ssl_steps: int = 100
    temporal_weight: float = 0.0  # weight of the frame-difference term of the clip loss (0 = per-frame L1)
    tf_weight: float = 0.0  # temporal finetuning: hidden states distilled from the dense model (training/distill.py)
    distill_weight: float = 0.0  # finetuning: the dense model's output distilled (training/distill.py)
    feature_distill_weight: float = 0.0  # finetuning: the dense model's residual stream features distilled
    # export
    precisions: tuple[str, ...] = ("fp32",)
    calib: str = "builtin"
    calib_method: str = DEFAULT_CALIB_METHOD
    io: str = "fp32"

    # -- resolution ---------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, recipe: Recipe, *, budget: float, method: str | None = None, **cli: Any) -> "Settings":
        """The recipe's defaults with the command line's values (``None`` = not given) on top, checked."""
        method = method or recipe_default_method(recipe)
        if method not in FAMILY_OF:
            raise UsageError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
        strategy = FAMILY_OF[method]
        other = next(f for f in FAMILY_OPTIONS if f != strategy)
        given = [k for k in FAMILY_OPTIONS[other] if cli.get(k) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does not apply to --method {method} "
                             f"({'an N:M' if other == 'nm' else 'a channel-pruning'} option)")
        if other == "nm" and not recipe.adapter.channel_groups(recipe.build_model()):
            raise UsageError(f"--method {method} prunes channel groups, and {recipe.describe_model()} declares none "
                             f"(its methods: {', '.join(NM_METHODS)})")
        modality = recipe.modality
        for opt in ("temporal_weight", "tf_weight"):
            if cli.get(opt) is not None and modality == "image":
                flag = "--frame-diff-weight" if opt == "temporal_weight" else "--tf-weight"
                raise UsageError(f"{flag} does not apply to {recipe.describe_model()}: it is an option of clip and "
                                 "step (video) models")
        st, prec = recipe.structured, recipe.precision
        values = {
            "budget": budget, "method": method, "strategy": strategy, "modality": modality,
            "seed": cli.get("seed") if cli.get("seed") is not None else 0,
            "steps": recipe.finetune.steps,
            "data": recipe.data_train, "eval_data": recipe.data_eval,
            "m": recipe.sparsity_m, "target": recipe.sparsity_target,
            "round_to": st.round_to, "keep_full": tuple(st.keep_full), "ssl_steps": st.ssl_steps,
            **({"selection": st.selection} if method in LEARNED_SCALES else {}),
            "temporal_weight": st.temporal_weight if modality != "image" else 0.0,
            "tf_weight": st.tf_weight if modality != "image" else 0.0,
            "distill_weight": recipe.distill.weight, "feature_distill_weight": recipe.distill.feature_weight,
            "precisions": tuple(dict.fromkeys(("fp32",) + tuple(prec.graphs))),
            "calib": prec.calib, "calib_method": prec.calib_method, "io": prec.io,
        }
        for k, v in cli.items():
            if v is None or k == "seed":
                continue
            if k not in cls.__dataclass_fields__:
                raise TypeError(f"unknown setting {k}")
            values[k] = v
        if tuple(values.get("keep_full") or ()) == ("none",):  # --keep-full none: drop the recipe's list
            values["keep_full"] = ()
        if values.get("precisions") is not None:
            values["precisions"] = tuple(dict.fromkeys(("fp32",) + tuple(values["precisions"])))
        return cls(**values).check(recipe)

    def with_overrides(self, recipe: Recipe, **changes: Any) -> "Settings":
        """The same settings with the non-None ``changes`` (a later stage's options), checked again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "precisions" in changes:
            changes["precisions"] = tuple(dict.fromkeys(("fp32",) + tuple(changes["precisions"])))
        return dataclasses.replace(self, **changes).check(recipe) if changes else self

    def check(self, recipe: Recipe) -> "Settings":
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and 0 < self.budget <= 1):
            raise UsageError(f"--budget must be in (0, 1], not {self.budget}")
        if self.m not in VALID_M:
            raise UsageError(f"M must be one of {', '.join(map(str, VALID_M))}, not {self.m}")
        given = [k for k in ("lam", "alpha") if getattr(self, k) is not None]
        if given and self.method not in SLS_SEARCH:
            raise UsageError(f"--{given[0]} is an SLS search setting; it does nothing with --method {self.method}")
        if self.n is not None:
            if self.method in SLS_SEARCH:
                raise UsageError("--n fixes a uniform N: use it with --method oneshot or srste "
                                 "(SLS chooses N per layer)")
            if not 1 <= self.n <= self.m:
                raise UsageError(f"--n must be in 1..{self.m} for M={self.m}, not {self.n}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise UsageError(f"--steps must be an integer >= 0, not {self.steps}")
        if self.units is not None and (self.strategy != "channels" or self.method in WITH_NM_PART):
            raise UsageError("given kept units (a nested family member) apply to channel methods other than hybrid")
        if self.method in LEARNED_SCALES and self.steps < 2 and self.units is None:
            raise UsageError(f"--method {self.method} learns its channel scales by training, then finetunes the "
                             f"narrower model: give --steps >= 2, not {self.steps}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, not '{self.target}'")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise UsageError(f"--round-to must be an integer >= 1, not {self.round_to}")
        if self.keep_full and self.strategy == "channels":
            names = [g.name for g in recipe.adapter.channel_groups(recipe.build_model())]
            unknown = [k for k in self.keep_full if not fnmatch.filter(names, k)]
            if unknown:
                raise UsageError(f"--keep-full '{unknown[0]}' is not a channel group of {recipe.describe_model()} "
                                 f"(its groups: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
            if set(names) <= set(self.kept_full(names)):
                raise UsageError("--keep-full names every channel group: nothing would be pruned")
        if self.selection not in SELECTIONS:
            raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, not '{self.selection}'")
        if self.selection != DEFAULT_SELECTION and self.method not in LEARNED_SCALES:
            raise UsageError(f"--selection applies to the learned scales of --method ssl/hybrid, not {self.method}")
        if not isinstance(self.ssl_steps, int) or self.ssl_steps < 1:
            raise UsageError(f"ssl steps must be an integer >= 1, not {self.ssl_steps}")
        if not math.isfinite(self.temporal_weight) or self.temporal_weight < 0:
            raise UsageError(f"--frame-diff-weight must be a finite number >= 0, not {self.temporal_weight:g}")
        for opt in ("tf_weight", "distill_weight", "feature_distill_weight"):
            v = getattr(self, opt)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UsageError(f"--{opt.replace('_', '-')} must be a finite number >= 0, not {v}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise UsageError(f"unknown precision '{p}' (known: {', '.join(PRECISIONS)})")
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not '{self.calib_method}'")
        if self.io not in IO_DTYPES:
            raise UsageError(f"--io must be fp32 or fp16, not '{self.io}'")
        if self.strategy == "nm":
            try:
                self.sls(recipe)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return self

    def kept_full(self, names) -> list[str]:
        """The group names ``keep_full`` matches (names or shell patterns such as '*.read')."""
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.keep_full)]

    def sls(self, recipe: Recipe):
        """The recipe's SLS settings with these M, lambda and alpha."""
        changes: dict[str, Any] = {"m": self.m}
        if self.lam is not None:
            changes["lam"] = self.lam
        if self.alpha is not None:
            changes["alpha"] = self.alpha
        return dataclasses.replace(recipe.sls, **changes).validate()

    def search_phase(self, recipe: Recipe) -> tuple[int, int]:
        """(steps the search phase may train, what the recipe asks for it) out of ``steps`` (search and finetune
        together): ssl/hybrid learn their channel scales for ``structured.ssl_steps``, SLS searches for at most
        ``sls.max_search_steps``; other methods (and given units) have no search phase. The search never takes the
        last quarter of ``steps``: finetuning the pruned model is what recovers its quality, and a search that took
        every step left a sliced, never-finetuned model (issue 23). The shipped recipes' defaults and the README's
        runs are within that share, so only a shorter ``--steps`` shrinks the search (``run_search`` says so)."""
        if self.method in SLS_SEARCH:
            need = recipe.sls_max_search_steps
        elif self.method in LEARNED_SCALES and self.units is None:
            need = self.ssl_steps
        else:
            return 0, 0
        return min(need, self.steps - math.ceil(self.steps / 4)), need

    def structured(self, recipe: Recipe):
        """The recipe's structured section with these method, round_to, ssl steps and temporal weight."""
        return dataclasses.replace(recipe.structured, method=self.method, round_to=self.round_to,
                                   ssl_steps=self.search_phase(recipe)[0], temporal_weight=self.temporal_weight)

    # -- the manifest ---------------------------------------------------------------------------------------
    def build_key(self, recipe: Recipe) -> dict[str, Any]:
        """What makes a bundle folder this bundle (a folder holding another build is refused)."""
        key = {"model": recipe.name, "arch": recipe.model.arch, "scale": recipe.scale, "budget": self.budget,
               "method": self.method, "strategy": self.strategy, "modality": self.modality}
        if self.keep_full:
            key["keep_full"] = sorted(self.keep_full)
        if self.selection != DEFAULT_SELECTION:
            key["selection"] = self.selection
        if self.strategy == "nm":  # the target changes an N:M plan (which layers may be N:M, what N costs)
            key["m"] = self.m
            key["target"] = self.target
            if self.n is not None:
                key["n"] = self.n
        return key

    def to_record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], recipe: Recipe) -> "Settings":
        fields = cls.__dataclass_fields__
        unknown = [k for k in record if k not in fields]
        if unknown:
            raise UsageError(f"the bundle's settings hold an unknown field '{unknown[0]}' (made by another version?)")
        values = {k: tuple(v) if k in ("precisions", "keep_full") else v for k, v in record.items()}
        values.setdefault("tf_weight", 0.0)  # bundles made before temporal finetuning existed
        values.setdefault("distill_weight", 0.0)  # ... before distillation existed
        values.setdefault("feature_distill_weight", 0.0)
        values.setdefault("selection", DEFAULT_SELECTION)
        values.setdefault("units", None)
        try:
            return cls(**values).check(recipe)
        except TypeError as e:
            raise UsageError(f"the bundle's settings are incomplete: {e}") from None


def recipe_default_method(recipe: Recipe) -> str:
    """The recipe's method: ``structured.method`` for a recipe that has a structured section and no sparsity
    section, else ``sparsity.method``."""
    raw = recipe.raw
    if "structured" in raw and "sparsity" not in raw:
        return recipe.structured.method
    return recipe.sparsity_method
