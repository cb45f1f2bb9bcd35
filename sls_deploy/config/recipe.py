"""Recipes: one YAML file per model, parsed into typed, validated sections.

``--model edsr`` means the recipe ``recipes/edsr.yaml`` shipped with the package; ``--recipe PATH`` reads any
file. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sls_deploy.core.device import ComputeSection
from sls_deploy.core.errors import RecipeError, UsageError, short_repr
from sls_deploy.core.numbers import (MAX_COUNT, MAX_LATENCY_RUNS, MAX_SIDE, MAX_STEPS, MAX_WORKSPACE_MB, as_float,
                                     as_int)
from sls_deploy.core.safe_yaml import load_yaml
from sls_deploy.core.vocabulary import CALIB_METHODS, DEFAULT_CALIB_METHOD, DEFAULT_PERCENTILE, IO_DTYPES, PRECISIONS
from sls_deploy.models import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS, ModelAdapter, ModelConfig, get_adapter
from sls_deploy.config.sls import SLSSettings
from sls_deploy.core.vocabulary import CHANNEL_METHODS, DEFAULT_TARGET, SELECTIONS, TARGETS


@dataclass(frozen=True)
class StepsSection:
    steps: int
    lr: float
    batch_size: int
    lr_patch: int
    checkpoint_every: int
    warmup: int = 0


@dataclass(frozen=True)
class DistillSection:
    """The ``distill:`` section: the dense model as teacher during finetuning (training/distill.py); 0 = off."""

    weight: float = 0.0  # L1 between the pruned and the dense model's outputs
    feature_weight: float = 0.0  # ... between their residual stream features (the adapter's feature_modules)


MAX_DISTILL_WEIGHT = 1000.0  # distill.weight / feature_weight (the L1 loss is O(0.01-0.1))
MAX_BATCH = 1024  # training batch (memory: batch x patch^2 x channels stays within a workstation's RAM)
MAX_PATCH = 512  # LR training patch side
MAX_OUTPUT_SIDE = 8192  # reference_output width/height: MACs are counted on an input of that size (8K UHD fits)
MAX_ENGINE_BATCH = 64  # N of the engine profile (validate runs every level)
MAX_SIZES = 64  # validate.sizes / latency_sizes entries (each is a full accuracy or latency check)
MAX_ISLANDS = 1000  # precision.fp32_islands names
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class PrecisionSection:
    graphs: tuple[str, ...] = PRECISIONS  # which graphs export writes (fp32 always)
    fp32_islands: tuple[str, ...] | None = None  # None: the adapter's default
    calib: str = "builtin"  # the package's calib/ images, or a folder
    calib_method: str = DEFAULT_CALIB_METHOD
    percentile: float = DEFAULT_PERCENTILE
    io: str = "fp32"


@dataclass(frozen=True)
class EngineSection:
    """The ``engine:`` section: one TensorRT optimization profile of the LR size, [N, H, W] at min / opt / max.

    Only batch and LR height/width live here. Every other dimension of every graph input (channels, a clip
    graph's T, a step graph's hidden width) is read off the adapter's example input by the engine stage
    (``trt.engine.profile_shapes``), so one section serves image, clip and step graphs alike.
    """

    min_nhw: tuple[int, int, int] = (1, 32, 32)
    opt_nhw: tuple[int, int, int] = (1, 180, 320)  # the deployment resolution: 1280x720 output at x4
    max_nhw: tuple[int, int, int] = (1, 270, 480)
    workspace_mb: int = 4096

    def levels(self) -> dict[str, tuple[int, int, int]]:
        """{"min"|"opt"|"max": (N, H, W)}."""
        return {"min": self.min_nhw, "opt": self.opt_nhw, "max": self.max_nhw}

    def profile_sizes(self) -> dict[str, tuple[int, int]]:
        """{"min"|"opt"|"max": LR (H, W)} of the optimization profile."""
        return {k: (h, w) for k, (_, h, w) in self.levels().items()}


@dataclass(frozen=True)
class ValidateSection:
    """What `validate` checks and the thresholds a bundle must meet to ship."""

    sizes: tuple[tuple[int, int], ...] = ((32, 32), (45, 61))  # extra LR (H, W) sizes beside the profile's
    odd_size: tuple[int, int] = (123, 157)  # an LR size no stride or tile divides
    fp32_atol: float = 1e-4  # FP32 graph vs PyTorch: max abs difference on [0, 1] outputs
    # a graph (or engine) fails when its eval PSNR is more than this below the FP32 PyTorch model's
    max_psnr_drop_db: tuple[tuple[str, float], ...] = (("fp32", 0.05), ("fp16", 0.1), ("int8", 0.5))
    latency_warmup: int = 2
    latency_runs: int = 10
    latency_sizes: tuple[tuple[int, int], ...] | None = None  # None: the engine profile's opt size
    # the quality gate (stages/validate_gate.py): the pruned model fails when its eval PSNR is more than this below
    # the dense base model's, or less than ``min_gain_vs_baseline_db`` above the task's baseline (bicubic for SR,
    # the blurred input for deblurring); None: that comparison is reported but not enforced
    max_drop_vs_dense_db: float | None = 0.5
    min_gain_vs_baseline_db: float | None = 0.0

    def max_drop(self, precision: str) -> float:
        return dict(self.max_psnr_drop_db)[precision]


@dataclass(frozen=True)
class StructuredSection:
    """Structured (channel) pruning of the channel groups an adapter declares (video models).

    ``ssl``: learned per-unit scales (``ChannelScales``) trained ``ssl_steps`` steps with a growing L2 penalty
    on the units that fall below the budget's global L1 threshold, then one global threshold on |scale|;
    ``l1``: the same kept fraction in every group by filter L1 norm (the uniform baseline); ``l1-global``: one
    global threshold on the normalised L1 norms. Penalty constants are for the L1 loss on [0, 1] pixels.
    """

    method: str = "ssl"
    round_to: int = 8  # kept units per group: a multiple of this (or the full width)
    ssl_steps: int = 100  # learned-scale training steps before selection (ssl only)
    reg: float = 0.0  # initial penalty coefficient on the marked units' scales
    delta: float = 1.0e-5  # added to the coefficient every grow_every steps (task gradients of a scale: ~1e-5) ...
    grow_every: int = 5
    cap: float = 1.0e-2  # ... up to this
    scale_lr: float = 2.0e-2  # Adam learning rate of the scales (fixed; the weights follow the finetune schedule)
    temporal_weight: float = 0.5  # frame-difference (temporal_l1) weight during ssl and finetuning; 0 = per-frame L1
    tf_weight: float = 0.0  # temporal finetuning: L1 between pruned and dense hidden states at every time step
    align: float = 0.0  # ASSL's Sparsity Structure Alignment weight on stream groups' producers (0: off)
    keep_full: tuple[str, ...] = ()  # channel groups kept at full width (e.g. [stream])
    selection: str = "normalised"  # ssl/hybrid width selection: normalised | raw | fisher (``--selection``)


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    raw: Mapping[str, Any]
    model: ModelConfig
    base_weights: str | None
    reference_output: tuple[int, int]  # (W, H) of the SR output for MAC counting
    data_train: str
    data_eval: str
    metric_channel: str
    train: StepsSection
    finetune: StepsSection
    sparsity_method: str
    sparsity_m: int
    sparsity_target: str
    opset: int
    exporter: str
    validate: ValidateSection
    precision: "PrecisionSection"
    engine: "EngineSection"
    sls: SLSSettings
    sls_max_search_steps: int
    srste_decay: float
    adapter: ModelAdapter = field(compare=False, repr=False)
    structured: StructuredSection = field(default_factory=StructuredSection)
    modality: str = "image"  # how data meets the model: image | clip | step (recipe key or the adapter's default)
    compute: ComputeSection = field(default_factory=ComputeSection)  # device / amp / channels_last defaults
    data_workers: int | str = "auto"  # data.workers: training's data loader processes ("auto" or a count)
    distill: DistillSection = field(default_factory=DistillSection)  # the dense model as teacher in finetuning

    @property
    def scale(self) -> int:
        return self.model.scale

    def digest(self) -> str:
        """A stable hash of the recipe's content (not of its file path). Left out: the compute section (where a
        run trains changes no setting, so a run interrupted on a GPU resumes on a CPU and the other way round)
        and data.workers (how many processes read the data changes no result, so a run resumes with another
        count)."""
        raw = {k: v for k, v in self.raw.items() if k != "compute"}
        if isinstance(raw.get("data"), Mapping) and "workers" in raw["data"]:
            raw["data"] = {k: v for k, v in raw["data"].items() if k != "workers"}
        return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def reference_input_hw(self) -> tuple[int, int]:
        w, h = self.reference_output
        return h // self.scale, w // self.scale

    def build_model(self):
        return self.adapter.build(self.model)

    def describe_model(self) -> str:
        return f"recipe '{self.name}' ({self.model.arch} x{self.scale}, {json.dumps(self.model.options)})"


def builtin_recipe_dir() -> Path:
    """The package's recipes/ (in a checkout a link to the top-level recipes/, in a wheel a copy of it)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_models() -> list[str]:
    return sorted(p.stem for p in builtin_recipe_dir().glob("*.yaml"))


def recipe_for_model(model: str) -> Path:
    path = builtin_recipe_dir() / f"{model}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown model '{model}' (known: {', '.join(builtin_models())}); "
                         "or give --recipe PATH")
    return path


_TOP_KEYS = {"name", "model", "base_weights", "reference_output", "data", "train", "finetune", "sparsity",
             "export", "validate", "description", "sls", "srste", "precision", "engine", "structured", "modality",
             "compute", "distill"}
_SLS_KEYS = {"lam", "alpha", "threshold", "check_every", "refresh_every", "score_lr", "score_clamp", "loss_scale",
             "cost_patch", "max_search_steps"}


def _sls(raw: Mapping[str, Any], m: int) -> tuple[SLSSettings, int]:
    sec = _section(raw, "sls", _SLS_KEYS)
    max_steps = as_int(sec.pop("max_search_steps", 100), "sls.max_search_steps", 1, MAX_STEPS)
    counts = {"check_every": MAX_COUNT, "refresh_every": MAX_COUNT, "cost_patch": MAX_OUTPUT_SIDE}
    values = {k: as_int(v, f"sls.{k}", 1, counts[k]) if k in counts else as_float(v, f"sls.{k}", 0.0)
              for k, v in sec.items()}
    try:
        settings = SLSSettings(m=m, **values).validate()
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe section 'sls': {e}") from None
    return settings, max_steps


def _key_text(key: Any) -> str:
    """A recipe key as a message quotes it: the name itself, cut short (a key can be any length of text)."""
    text = key if isinstance(key, str) else short_repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _section(raw: Mapping[str, Any], key: str, known: set[str]) -> dict[str, Any]:
    sec = raw.get(key) or {}
    if not isinstance(sec, Mapping):
        raise RecipeError(f"recipe section '{key}' must be a mapping")
    unknown = sorted(set(sec) - known, key=str)
    if unknown:
        raise RecipeError(f"unknown recipe key '{key}.{_key_text(unknown[0])}' (known: {', '.join(sorted(known))})")
    return dict(sec)


def _steps(raw: Mapping[str, Any], key: str) -> StepsSection:
    sec = _section(raw, key, {"steps", "lr", "batch_size", "lr_patch", "checkpoint_every", "warmup"})
    steps = as_int(sec.get("steps", 100), f"{key}.steps", 0, MAX_STEPS)
    return StepsSection(steps=steps, lr=as_float(sec.get("lr", 1e-4), f"{key}.lr", 0.0, 1.0, lo_open=True),
                        batch_size=as_int(sec.get("batch_size", 16), f"{key}.batch_size", 1, MAX_BATCH),
                        lr_patch=as_int(sec.get("lr_patch", 24), f"{key}.lr_patch", 1, MAX_PATCH),
                        checkpoint_every=as_int(sec.get("checkpoint_every", 50), f"{key}.checkpoint_every", 0,
                                                MAX_COUNT),
                        warmup=as_int(sec.get("warmup", 0), f"{key}.warmup", 0, MAX_STEPS))


def _distill(raw: Mapping[str, Any]) -> DistillSection:
    sec = _section(raw, "distill", {"weight", "feature_weight"})
    return DistillSection(**{k: as_float(sec.get(k, 0.0), f"distill.{k}", 0.0, MAX_DISTILL_WEIGHT)
                             for k in ("weight", "feature_weight")})


_ENGINE_LEVELS = ("min", "opt", "max")


def _engine_nhw(sec: Mapping[str, Any], key: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if key not in sec:
        return default
    v = sec[key]
    if (not isinstance(v, (list, tuple)) or len(v) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise RecipeError(f"engine.{key} must be [N, H, W] (three integers: batch, LR height, LR width), "
                          f"not {short_repr(v)}")
    if min(v) < 1:
        raise RecipeError(f"engine.{key} must be [N, H, W] with every value >= 1, not {short_repr(list(v))}")
    if v[0] > MAX_ENGINE_BATCH or max(v[1:]) > MAX_SIDE:
        raise RecipeError(f"engine.{key} must be [N, H, W] with N at most {MAX_ENGINE_BATCH} and H, W at most "
                          f"{MAX_SIDE}, not {short_repr(list(v))}")
    return (v[0], v[1], v[2])


def _engine(raw: Mapping[str, Any]) -> EngineSection:
    # max_psnr_drop_db moved to the validate section; recipes (and bundles) that still carry it here are read
    # (by _validate); here only its form is checked, so a bad value is a one-line error
    sec = _section(raw, "engine", {*_ENGINE_LEVELS, "workspace_mb", "max_psnr_drop_db"})
    legacy = sec.get("max_psnr_drop_db")
    if legacy is not None and not isinstance(legacy, Mapping):
        raise RecipeError(f"engine.max_psnr_drop_db (legacy; now validate.max_psnr_drop_db) must be a mapping "
                          f"{{precision: dB}}, not {short_repr(legacy)}")
    d = EngineSection()
    nhw = [_engine_nhw(sec, k, default) for k, default in zip(_ENGINE_LEVELS, (d.min_nhw, d.opt_nhw, d.max_nhw))]
    workspace = sec.get("workspace_mb", d.workspace_mb)
    if not isinstance(workspace, int) or isinstance(workspace, bool) or not 1 <= workspace <= MAX_WORKSPACE_MB:
        raise RecipeError(f"engine.workspace_mb must be an integer >= 1 and at most {MAX_WORKSPACE_MB} (1 TiB), "
                          f"not {short_repr(workspace)}")
    if not all(a <= b <= c for a, b, c in zip(*nhw)):
        raise RecipeError("engine: need min <= opt <= max in every dimension of [N, H, W] "
                          f"(min {list(nhw[0])}, opt {list(nhw[1])}, max {list(nhw[2])})")
    return EngineSection(min_nhw=nhw[0], opt_nhw=nhw[1], max_nhw=nhw[2], workspace_mb=workspace)


def _hw_list(value: Any) -> tuple[tuple[int, int], ...]:
    """[[H, W], ...] (at most MAX_SIZES pairs) with integral H, W in 1..MAX_SIDE."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in value):
        raise ValueError(f"not a list of [H, W] pairs: {short_repr(value)}")
    if len(value) > MAX_SIZES:
        raise ValueError(f"{len(value)} sizes; at most {MAX_SIZES}")
    return tuple((as_int(h, "a size's H", 1, MAX_SIDE, error=ValueError),
                  as_int(w, "a size's W", 1, MAX_SIDE, error=ValueError)) for h, w in value)


def _validate(raw: Mapping[str, Any]) -> ValidateSection:
    sec = _section(raw, "validate", {"sizes", "odd_size", "fp32_atol", "max_psnr_drop_db", "latency_warmup",
                                     "latency_runs", "latency_sizes", "max_drop_vs_dense_db",
                                     "min_gain_vs_baseline_db"})
    d = ValidateSection()
    engine = raw.get("engine") or {}
    legacy = _drops(engine.get("max_psnr_drop_db") if isinstance(engine, Mapping) else None, "engine.max_psnr_drop_db")
    drops = {**dict(d.max_psnr_drop_db), **legacy,
             **_drops(sec.get("max_psnr_drop_db"), "validate.max_psnr_drop_db")}
    gate = {k: _gate_limit(sec, k, getattr(d, k), lo) for k, lo in (("max_drop_vs_dense_db", 0.0),
                                                                      ("min_gain_vs_baseline_db", -GATE_DB))}
    try:
        out = ValidateSection(
            sizes=_hw_list(sec.get("sizes", d.sizes)), odd_size=_hw_list([sec.get("odd_size", d.odd_size)])[0],
            fp32_atol=as_float(sec.get("fp32_atol", d.fp32_atol), "validate.fp32_atol", 0.0, lo_open=True),
            max_psnr_drop_db=tuple(sorted(drops.items())),
            latency_warmup=as_int(sec.get("latency_warmup", d.latency_warmup), "validate.latency_warmup", 0, 1000),
            latency_runs=as_int(sec.get("latency_runs", d.latency_runs), "validate.latency_runs", 1,
                                MAX_LATENCY_RUNS),
            latency_sizes=_hw_list(sec["latency_sizes"]) if sec.get("latency_sizes") else None, **gate)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe section 'validate': sizes are [H, W] pairs ({e})") from None
    return out


GATE_DB = 100.0  # the quality gate's limits are dB differences within +-this


def _gate_limit(sec: Mapping[str, Any], key: str, default: float | None, lo: float) -> float | None:
    """A quality-gate limit in dB (``null``: reported, not enforced); absent: the default."""
    if key not in sec:
        return default
    if sec[key] is None:
        return None
    return as_float(sec[key], f"validate.{key}", lo, GATE_DB)


def _drops(value: Any, what: str) -> dict[str, float]:
    """{precision: max PSNR drop in dB} from a recipe mapping (None: none given)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{what} must be a mapping of precision to dB, e.g. {{fp16: 0.1}}, not {short_repr(value)}")
    out = {}
    for k, v in value.items():
        if k not in PRECISIONS:
            raise RecipeError(f"{what}: unknown precision {short_repr(k)} (known: {', '.join(PRECISIONS)})")
        out[k] = as_float(v, f"{what}.{k}", 0.0)
    return out


def _structured(raw: Mapping[str, Any]) -> StructuredSection:
    d = StructuredSection()
    sec = _section(raw, "structured", set(d.__dataclass_fields__) | {"hybrid_2to4"})
    values: dict[str, Any] = {}
    for k, v in sec.items():
        if k in ("method", "selection"):
            values[k] = str(v)
        elif k in ("round_to", "ssl_steps", "grow_every"):
            values[k] = as_int(v, f"structured.{k}", 1, MAX_STEPS if k == "ssl_steps" else MAX_COUNT)
        elif k == "keep_full":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise RecipeError(f"structured.keep_full must be a list of channel group names, not {short_repr(v)}")
            values[k] = tuple(v)
        elif k != "hybrid_2to4":
            values[k] = as_float(v, f"structured.{k}", 0.0)
    hybrid = sec.get("hybrid_2to4", False)
    if not isinstance(hybrid, bool):
        raise RecipeError(f"structured.hybrid_2to4 must be true or false, not {short_repr(hybrid)}")
    if hybrid:
        raise RecipeError("structured.hybrid_2to4 (2:4 on top of channel pruning) is not implemented yet")
    out = StructuredSection(**values)
    if out.method not in CHANNEL_METHODS:
        raise RecipeError(f"structured.method must be one of {', '.join(CHANNEL_METHODS)}, "
                          f"not {short_repr(out.method)}")
    if out.selection not in SELECTIONS:
        raise RecipeError(f"structured.selection must be one of {', '.join(SELECTIONS)}, "
                          f"not {short_repr(out.selection)}")
    if out.round_to < 1 or out.ssl_steps < 1 or out.grow_every < 1:
        raise RecipeError("structured: round_to, ssl_steps and grow_every must be >= 1")
    if min(out.reg, out.delta, out.cap, out.temporal_weight, out.align) < 0 or out.reg > out.cap or out.scale_lr <= 0:
        raise RecipeError("structured: reg, delta, cap and temporal_weight must be >= 0, reg <= cap, scale_lr > 0")
    return out


def _precision(raw: Mapping[str, Any]) -> PrecisionSection:
    sec = _section(raw, "precision", {"graphs", "fp32_islands", "calib", "calib_method", "percentile", "io"})
    graphs, islands = sec.get("graphs", PRECISIONS), sec.get("fp32_islands")
    for what, names, most in (("graphs", graphs, 16), ("fp32_islands", islands, MAX_ISLANDS)):
        if (names is not None or what == "graphs") and (not isinstance(names, (list, tuple)) or len(names) > most
                                                        or not all(isinstance(g, str) for g in names)):
            raise RecipeError(f"precision.{what} must be a list of at most {most} names, not {short_repr(names)}")
    out = PrecisionSection(graphs=tuple(graphs), fp32_islands=None if islands is None else tuple(islands),
                           calib=str(sec.get("calib", "builtin")),
                           calib_method=str(sec.get("calib_method", DEFAULT_CALIB_METHOD)),
                           percentile=as_float(sec.get("percentile", DEFAULT_PERCENTILE), "precision.percentile", 0.0, 100.0,
                                               lo_open=True),
                           io=str(sec.get("io", "fp32")))
    bad = [g for g in out.graphs if g not in PRECISIONS]
    if bad:
        raise RecipeError(f"precision.graphs: unknown precision '{bad[0]}' (known: {', '.join(PRECISIONS)})")
    if out.calib_method not in CALIB_METHODS:
        raise RecipeError("precision.calib_method must be max, percentile or entropy, "
                          f"not {short_repr(out.calib_method)}")
    if out.io not in IO_DTYPES:
        raise RecipeError(f"precision.io must be fp32 or fp16, not {short_repr(out.io)}")
    return out


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
    raw = load_yaml(path, "recipe", RecipeError)
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe {path} must be a YAML mapping")
    unknown = sorted(set(raw) - _TOP_KEYS, key=str)
    if unknown:
        raise RecipeError(f"unknown recipe key '{_key_text(unknown[0])}' in {path}")
    if not isinstance(raw.get("model"), Mapping) or "arch" not in raw["model"]:
        raise RecipeError(f"recipe {path} needs a 'model' section with 'arch'")
    if "scale" in raw["model"]:
        as_int(raw["model"]["scale"], "model.scale", 1, 16)
    name = raw.get("name", path.stem)  # a file's stem holds no path separator; a name given in the file might
    if "name" in raw and (not isinstance(name, str) or not name or not set(name) <= NAME_CHARS or name.startswith(".")):
        raise RecipeError(f"recipe name {short_repr(name)} must be letters, digits, '.', '_' or '-' "
                          "(it names files under runs/)")
    adapter = get_adapter(str(raw["model"]["arch"]))
    model_cfg = adapter.parse_config(raw["model"])
    data = _section(raw, "data", {"train", "eval", "metric_channel", "workers"})
    sparsity = _section(raw, "sparsity", {"method", "m", "target"})
    srste = _section(raw, "srste", {"decay"})
    export = _section(raw, "export", {"opset", "exporter"})
    engine = _engine(raw)  # first: _validate reads the engine section's legacy max_psnr_drop_db
    validate = _validate(raw)
    ref = raw.get("reference_output", (1280, 720))
    if not isinstance(ref, (list, tuple)) or len(ref) != 2:
        raise RecipeError(f"reference_output must be [width, height], not {short_repr(ref)}")
    ref = tuple(as_int(v, f"reference_output {what}", model_cfg.scale, MAX_OUTPUT_SIDE)
                for v, what in zip(ref, ("width", "height")))
    opset = as_int(export.get("opset", DEFAULT_OPSET), "export.opset", 17)
    m = as_int(sparsity.get("m", 4), "sparsity.m")
    # the default exporter writes opset 18 or later: a recipe asking for opset 17 without naming an exporter (every
    # recipe and bundle from before dynamo became the default) keeps the TorchScript exporter, the one that writes it
    exporter = str(export.get("exporter", DEFAULT_EXPORTER if opset >= 18 else "torchscript"))
    if exporter not in EXPORTERS:
        raise RecipeError(f"export.exporter must be dynamo or torchscript, not {short_repr(exporter)}")
    if exporter == "dynamo" and opset < 18:
        raise RecipeError("export.exporter dynamo writes opset 18 or later: set export.opset: 18, "
                          "or export.exporter: torchscript for opset 17")
    if m not in (4, 8, 16, 32):
        raise RecipeError(f"sparsity.m must be 4, 8, 16 or 32, not {m}")
    target = str(sparsity.get("target", DEFAULT_TARGET))
    if target not in TARGETS:
        raise RecipeError(f"sparsity.target must be one of {', '.join(TARGETS)}, not {short_repr(target)}")
    precision = _precision(raw)
    sls_settings, max_search = _sls(raw, m)
    decay = as_float(srste.get("decay", 2e-4), "srste.decay", 0.0)
    modality = _modality(raw, adapter)
    if raw.get("base_weights") is not None and not isinstance(raw["base_weights"], str):
        raise RecipeError(f"base_weights must be a file name or path, not {short_repr(raw['base_weights'])}")
    channel = str(data.get("metric_channel", "y")).lower()
    if channel not in ("y", "rgb"):
        raise RecipeError(f"data.metric_channel must be 'y' or 'rgb', not {short_repr(channel)}")
    workers = data.get("workers", "auto")
    if workers != "auto":
        workers = as_int(workers, "data.workers", 0, 256)
    return Recipe(
        name=str(raw.get("name", path.stem)), path=str(path), raw=raw, model=model_cfg,
        base_weights=raw.get("base_weights"), reference_output=(ref[0], ref[1]),
        data_train=str(data.get("train", "skimage:train")), data_eval=str(data.get("eval", "skimage:eval")),
        metric_channel=channel, train=_steps(raw, "train"), finetune=_steps(raw, "finetune"),
        sparsity_method=str(sparsity.get("method", "oneshot")), sparsity_m=m, sparsity_target=target, opset=opset,
        exporter=exporter,
        validate=validate, precision=precision, engine=engine, sls=sls_settings, sls_max_search_steps=max_search,
        srste_decay=decay, adapter=adapter, structured=_structured(raw), modality=modality, compute=_compute(raw),
        data_workers=workers, distill=_distill(raw))


MODALITIES = ("image", "clip", "step")


def _compute(raw: Mapping[str, Any]) -> ComputeSection:
    """``compute: {device: auto|cpu|cuda|cuda:N, amp: off|bf16|fp16, channels_last: off|on|cuda}``: the
    defaults of --device, --amp and --channels-last (form checked here, availability where it is used)."""
    d = ComputeSection()
    sec = _section(raw, "compute", set(d.__dataclass_fields__))
    # YAML 1.1 reads a bare off / on as false / true: take them as the words they were written as
    words = {"amp": {False: "off"}, "channels_last": {False: "off", True: "on"}}
    values = {k: words.get(k, {}).get(v, v) if isinstance(v, bool) else v for k, v in sec.items()}
    return ComputeSection(**values).check(RecipeError)


def _modality(raw: Mapping[str, Any], adapter: ModelAdapter) -> str:
    """The recipe's ``modality`` (one the adapter supports), else the adapter's first."""
    supported = adapter.modalities()
    value = raw.get("modality", supported[0])
    if value not in MODALITIES:
        raise RecipeError(f"unknown modality {short_repr(value)} (known: {', '.join(MODALITIES)})")
    if value not in supported:
        raise RecipeError(f"modality '{value}' is not supported by model '{adapter.arch}' "
                          f"(it supports: {', '.join(supported)})")
    return value


def resolve_recipe(model: str | None, recipe: str | os.PathLike | None) -> Recipe:
    """``--model NAME`` or ``--recipe PATH`` (exactly one) -> Recipe."""
    if model and recipe:
        raise UsageError("give either --model or --recipe, not both")
    if not model and not recipe:
        raise UsageError("give --model NAME or --recipe PATH")
    return load_recipe(recipe_for_model(model) if model else recipe)

