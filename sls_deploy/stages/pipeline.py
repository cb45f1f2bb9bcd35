"""The build's stages and their orchestration: recipe -> model -> plan -> weights -> graph -> report.

Each stage reads artifacts from the bundle (and the recipe copy in it), writes its own outputs atomically and
records them in the manifest. ``build`` runs the stages in order and skips those already up to date, so an
interrupted build resumes where it stopped (mid-finetune from the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sls_deploy.core import atomic
from sls_deploy.core import distributed as dist
from sls_deploy.core.bundle import GRAPH_FILES, ONNX, PLAN, RECIPE, WEIGHTS, Bundle, digest
from sls_deploy.core.checkpoints import load_weights, read_state_dict, save_weights
from sls_deploy.data import PatchSampler, resolve_images
from sls_deploy.core.errors import CheckpointError, PlanError, RecipeError, UsageError, ValidationError
from sls_deploy.onnx.export import export_onnx, load_onnx, verify_plan_in_graph
from sls_deploy.config.recipe import PRECISIONS, Recipe, load_recipe
from sls_deploy.pruning.nm.search import METHODS, plan_uniform, search_sls, split_layers
from sls_deploy.pruning.nm import MaskSet, Plan, nm_mask
from sls_deploy.pruning.nm.patterns import VALID_M
from sls_deploy.pruning.nm.oneshot import check_budget
from sls_deploy.pruning.nm.srste import SRSTE
from sls_deploy.training.loop import TrainConfig, train

SEARCH_WEIGHTS = "search.safetensors"
IMPORTED_DENSE = "imported.dense.safetensors"  # the imported checkpoint's weights before masking
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
Log = Callable[[str], None]


@dataclass
class BuildOptions:
    budget: float
    method: str = "sls"
    m: int | None = None  # None: the recipe's
    n: int | None = None  # uniform N for oneshot/srste; None: the largest N within the budget
    target: str = "trt"  # "trt": the plan states which layers run on 2:4 sparse kernels; "none": no target
    precisions: tuple[str, ...] | None = None  # graphs to export; None: the recipe's
    calib: str | None = None  # calibration folder; None: the recipe's
    calib_method: str | None = None
    io: str | None = None
    lam: float | None = None  # SLS lambda; None: the recipe's
    alpha: float | None = None  # SLS alpha; None: the recipe's
    weights: str | None = None  # base weights; None: the recipe's shipped weights
    data: str | None = None  # training images for finetune; None: the recipe's list
    eval_data: str | None = None
    steps: int | None = None  # finetune steps; None: the recipe's
    seed: int = 0
    progress: bool = True
    log: Log = field(default=print, repr=False)


def resolve_base_weights(recipe: Recipe, override: str | None) -> Path:
    if override:
        return Path(override)
    if not recipe.base_weights:
        raise CheckpointError(f"recipe '{recipe.name}' names no base_weights; pass --weights PATH")
    p = Path(recipe.base_weights)
    if p.is_absolute() or p.parent != Path("."):
        return p if p.is_absolute() else Path(recipe.path).parent / p
    return WEIGHTS_DIR / p


def load_model(recipe: Recipe, weights: Path) -> torch.nn.Module:
    """The recipe's model with ``weights`` loaded (foreign layouts converted, fit checked, safe loading)."""
    model = recipe.build_model()
    sd = recipe.adapter.convert_state_dict(read_state_dict(weights), recipe.model)
    load_weights(model, sd, recipe.describe_model())
    return model.eval()


def build_key(recipe: Recipe, opts: BuildOptions) -> dict[str, Any]:
    key = {"model": recipe.name, "arch": recipe.model.arch, "scale": recipe.scale, "budget": opts.budget,
           "method": opts.method, "m": opts.m or recipe.sparsity_m}
    if opts.n is not None:
        key["n"] = opts.n
    return key


def options_record(opts: BuildOptions) -> dict[str, Any]:
    """What the manifest keeps of the options (the seed, weights and data that made the bundle)."""
    return {k: getattr(opts, k) for k in ("seed", "weights", "data", "eval_data", "steps", "n", "lam", "alpha",
                                          "target", "precisions", "calib", "calib_method", "io")}


def check_options(recipe: Recipe, opts: BuildOptions) -> None:
    try:
        check_budget(opts.budget)
    except PlanError as e:
        raise UsageError(str(e)) from None
    if opts.method not in METHODS:
        raise UsageError(f"unknown method '{opts.method}' (known: {', '.join(METHODS)})")
    m = opts.m or recipe.sparsity_m
    if m not in VALID_M:
        raise UsageError(f"M must be one of {', '.join(map(str, VALID_M))}, not {m}")
    if opts.n is not None:
        if opts.method == "sls":
            raise UsageError("--n fixes a uniform N: use it with --method oneshot or srste (SLS chooses N per layer)")
        if not 1 <= opts.n <= m:
            raise UsageError(f"--n must be in 1..{m} for M={m}, not {opts.n}")
    if opts.steps is not None and opts.steps < 0:
        raise UsageError(f"--steps must be >= 0, not {opts.steps}")
    if opts.target not in ("trt", "none"):
        raise UsageError(f"--target must be trt or none, not '{opts.target}'")
    for p in opts.precisions or ():
        if p not in PRECISIONS:
            raise UsageError(f"unknown precision '{p}' (known: {', '.join(PRECISIONS)})")
    try:
        sls_settings(recipe, opts)
    except ValueError as e:
        raise UsageError(str(e)) from None


def sls_settings(recipe: Recipe, opts: BuildOptions):
    """The recipe's SLS settings with the command line's M, lambda and alpha."""
    changes = {"m": opts.m or recipe.sparsity_m}
    if opts.lam is not None:
        changes["lam"] = opts.lam
    if opts.alpha is not None:
        changes["alpha"] = opts.alpha
    return dataclasses.replace(recipe.sls, **changes).validate()


def pruning_steps(recipe: Recipe, opts: BuildOptions) -> int:
    """Training steps after the base model, search and finetune together (the same for every method)."""
    return recipe.finetune.steps if opts.steps is None else opts.steps


def fp32_islands(recipe: Recipe, model: torch.nn.Module) -> list[str]:
    """The recipe's FP32 islands (or the adapter's default); each must name a weight layer of the model."""
    islands = list(recipe.precision.fp32_islands if recipe.precision.fp32_islands is not None
                   else recipe.adapter.default_fp32_islands(model))
    layers = {d.name for d in recipe.adapter.layers(model)}
    for name in islands:
        if name not in layers:
            raise RecipeError(f"precision.fp32_islands: '{name}' matches no layer of {recipe.describe_model()}")
    return islands


# -- stage: search ----------------------------------------------------------------------------------------
def run_search(bundle: Bundle, recipe: Recipe, opts: BuildOptions) -> Plan:
    base = resolve_base_weights(recipe, opts.weights)
    m = opts.m or recipe.sparsity_m
    settings = sls_settings(recipe, opts)
    total = pruning_steps(recipe, opts)
    inputs = digest({"key": build_key(recipe, opts), "base": atomic.sha256_file(base) if base.is_file() else None,
                     "ref": recipe.reference_output, "model": recipe.model.options, "seed": opts.seed,
                     **({"sls": settings.__dict__, "max": min(recipe.sls_max_search_steps, total),
                         "data": opts.data or recipe.data_train, "ft": recipe.finetune.__dict__}
                        if opts.method == "sls" else {})})
    if bundle.stage_is_current("search", inputs):
        opts.log("  up to date")
        return Plan.load(bundle.path(PLAN))
    t0 = time.perf_counter()
    model = load_model(recipe, base)
    split = split_layers(recipe, model, m)
    outputs, init = [PLAN], str(base)
    if opts.method == "sls":
        sec = recipe.finetune
        sampler = PatchSampler(resolve_images(opts.data or recipe.data_train), recipe.scale, sec.lr_patch,
                               sec.batch_size, seed=opts.seed + 1000 * dist.rank())
        ckpt = bundle.work / "search.ckpt"
        plan, _ = search_sls(recipe, model, split, opts.budget, settings, sampler,
                             max_steps=min(recipe.sls_max_search_steps, total), lr=sec.lr, checkpoint=ckpt,
                             run_key=inputs, seed=opts.seed, progress=opts.progress)
        plans = dist.gather([(l.name, l.n) for l in plan.layers])
        if any(p != plans[0] for p in plans):
            raise PlanError("the ranks of this torchrun job found different plans (non-deterministic search?)")
        if dist.is_main():
            save_weights(model, bundle.path(SEARCH_WEIGHTS), {"plan": "sls"})
            if ckpt.exists():
                ckpt.unlink()
        outputs.append(SEARCH_WEIGHTS)
        init = str(bundle.path(SEARCH_WEIGHTS))
    else:
        plan = plan_uniform(recipe, split, opts.budget, m, opts.method, n=opts.n)
    plan.seed = opts.seed
    plan.target = opts.target
    plan.fp32_islands = fp32_islands(recipe, model)
    for layer in plan.layers:
        layer.precision = "fp32" if layer.name in plan.fp32_islands else "fp16/int8"
    plan.search["world_size"] = dist.world_size()
    if dist.is_main():
        plan.save(bundle.path(PLAN))
        bundle.record_stage("search", inputs, outputs, time.perf_counter() - t0,
                            {"base_weights": str(base), "base_weights_sha256": atomic.sha256_file(base),
                             "init_weights": init})
    dist.barrier()
    return plan


def run_import(recipe: Recipe, source: Path, out: Path, weights: str | None, m: int | None) -> Plan:
    """``import-sls``: a bundle whose plan and starting weights come from masks searched elsewhere."""
    from sls_deploy.pruning.nm.importing import import_masks, masks_from_sls_checkpoint, read_mask_file

    if source.suffix == ".safetensors" and not any(k.endswith(".priority_scores")
                                                   for k in read_state_dict(source)):
        base = resolve_base_weights(recipe, weights)
        masks, group_m = read_mask_file(source), m or recipe.sparsity_m
        dense_sd = recipe.adapter.convert_state_dict(read_state_dict(base), recipe.model)
    else:
        dense_sd, masks, group_m = masks_from_sls_checkpoint(read_state_dict(source))
        if m and m != group_m:
            raise UsageError(f"--m {m} differs from the checkpoint's pruning units (M={group_m})")
    plan, model, dense = import_masks(recipe, dense_sd, masks, group_m)
    bundle = Bundle(out)
    key = {"model": recipe.name, "arch": recipe.model.arch, "scale": recipe.scale, "budget": plan.budget,
           "method": "imported", "m": group_m}
    bundle.claim(key, Path(recipe.path).read_text(), {"source": str(source), "weights": weights})
    save_weights(dense, bundle.path(IMPORTED_DENSE), {"source": str(source)})
    save_weights(model, bundle.path(SEARCH_WEIGHTS), {"plan": "imported"})
    plan.save(bundle.path(PLAN))
    bundle.record_stage("search", digest({"source": atomic.sha256_file(source)}), [PLAN, SEARCH_WEIGHTS,
                        IMPORTED_DENSE], 0.0, {"base_weights": str(bundle.path(IMPORTED_DENSE)),
                                               "init_weights": str(bundle.path(SEARCH_WEIGHTS)),
                                               "source": str(source)})
    return plan


# -- stage: finetune --------------------------------------------------------------------------------------
def masks_for(model: torch.nn.Module, plan: Plan) -> MaskSet:
    """Masks follow from the weights and the plan: top-N |w| in each group of M input channels."""
    modules = dict(model.named_modules())
    return MaskSet({l.name: nm_mask(modules[l.name].weight, l.n, l.m) for l in plan.layers if l.n < l.m})


def finetune_checkpoint(bundle: Bundle) -> Path:
    return bundle.work / "finetune.ckpt"


def check_resume(ckpt: Path, inputs: str, steps: int, resume: bool | None, log: Log, what: str = "finetune") -> None:
    """What to do with a checkpoint an interrupted ``what`` left: keep it to resume (its run key matches),
    refuse (``resume`` False, or True and it does not match) or discard it (``resume`` None, no match)."""
    if not ckpt.exists():
        return
    if resume is False:
        raise CheckpointError(f"{ckpt} exists (an interrupted {what}); pass --resume to continue it "
                              "or --restart to discard it")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        matches = isinstance(state, dict) and state.get("run_key") == inputs
    except Exception:
        if resume:
            raise CheckpointError(f"cannot read {ckpt} (corrupt?); pass --restart to discard it") from None
        state, matches = None, False
    if matches:
        log(f"  resuming {what} from step {state['step']}/{steps}")
    elif resume:
        raise CheckpointError(f"{ckpt} belongs to other {what} settings (plan, weights, steps or data "
                              "changed); pass --restart to discard it")
    else:
        log(f"  discarding {ckpt.name}: it belongs to other {what} settings")
        dist.barrier()  # every rank has read it before rank 0 removes it
        if dist.is_main():
            ckpt.unlink()
        dist.barrier()


def run_finetune(bundle: Bundle, recipe: Recipe, opts: BuildOptions, resume: bool | None = None) -> dict:
    """Masked finetuning from the base weights.

    A checkpoint left by an interrupted run is resumed when ``resume`` is True (error if it does not match)
    or None (discarded with a note if it does not match, as ``build`` does); ``resume=False`` refuses to touch it.
    """
    plan = Plan.load(bundle.path(PLAN))
    search = bundle.manifest()["stages"]["search"]
    base = Path(search.get("init_weights") or search["base_weights"])
    sec = recipe.finetune
    steps = max(0, pruning_steps(recipe, opts) - int(plan.search.get("steps", 0)))
    data = opts.data or recipe.data_train
    inputs = digest({"plan": atomic.sha256_file(bundle.path(PLAN)), "base": atomic.sha256_file(base),
                     "steps": steps, "sec": sec.__dict__, "data": data, "seed": opts.seed})
    if bundle.stage_is_current("finetune", inputs):
        opts.log("  up to date")
        return bundle.manifest()["stages"]["finetune"].get("result", {})
    ckpt = finetune_checkpoint(bundle)
    check_resume(ckpt, inputs, steps, resume, opts.log)
    t0 = time.perf_counter()
    model = load_model(recipe, base)
    masks = masks_for(model, plan)
    controller = (SRSTE([(l.name, l.n) for l in plan.layers if l.n < l.m], plan.m, recipe.srste_decay)
                  if plan.method == "srste" else masks)
    sampler = PatchSampler(resolve_images(data), recipe.scale, sec.lr_patch, sec.batch_size,
                           seed=opts.seed + 1 + 1000 * dist.rank())
    cfg = TrainConfig(steps=steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                      seed=opts.seed)
    result = train(model, sampler, cfg, checkpoint=ckpt, resume=True, run_key=inputs, controller=controller,
                   desc="finetune", progress=opts.progress)
    if plan.method == "srste":  # SR-STE's masks moved with the weights: take the final ones
        masks = masks_for(model, plan)
    masks.apply(model)  # steps == 0: the one-shot pruned model itself
    info = {"steps": result.steps_done, "resumed_from": result.resumed_from,
            "seconds": round(result.seconds, 1), "final_loss": result.final_loss, "world_size": dist.world_size()}
    if dist.is_main():
        save_weights(model, bundle.path(WEIGHTS), {"plan": plan.method, "budget": str(plan.budget)})
        bundle.record_stage("finetune", inputs, [WEIGHTS], time.perf_counter() - t0, {"result": info})
        if ckpt.exists():
            ckpt.unlink()
    dist.barrier()
    return info


# -- stage: export ---------------------------------------------------------------------------------------
CALIB_CACHE = "calib_cache.json"
BUILTIN_CALIB = Path(__file__).resolve().parent.parent / "calib"


@dataclass
class PrecisionOptions:
    graphs: tuple[str, ...]
    calib: Path
    calib_method: str
    percentile: float
    io: str


def precision_options(recipe: Recipe, opts: BuildOptions) -> PrecisionOptions:
    sec = recipe.precision
    graphs = tuple(dict.fromkeys(("fp32",) + tuple(opts.precisions or sec.graphs)))
    calib = opts.calib or sec.calib
    return PrecisionOptions(graphs=graphs, calib=BUILTIN_CALIB if calib == "builtin" else Path(calib),
                            calib_method=opts.calib_method or sec.calib_method, percentile=sec.percentile,
                            io=opts.io or sec.io)


def _calibration(bundle: Bundle, fp32_model, inputs: dict[str, str], images, hashes, po: PrecisionOptions,
                 fp32_sha: str) -> tuple[dict[str, float], bool]:
    """Activation ranges, from the bundle's cache when the same images, method and graph made it."""
    from sls_deploy.onnx.precision.int8 import calibrate

    key = {"method": po.calib_method, "percentile": po.percentile, "images": hashes, "fp32_graph": fp32_sha}
    cache = bundle.path(CALIB_CACHE)
    if cache.is_file():
        try:
            old = json.loads(cache.read_text())
            if old.get("key") == key and set(inputs.values()) <= set(old.get("amax", {})):
                return old["amax"], True
        except json.JSONDecodeError:
            pass
    amax = calibrate(fp32_model, "lr", images, list(inputs.values()), po.calib_method, po.percentile)
    atomic.write_json(cache, {"key": key, "amax": amax,
                              "note": "per-tensor |x| ranges for INT8 (scale = amax / 127), by sls-deploy export"})
    return amax, False


def run_export(bundle: Bundle, recipe: Recipe, opts: BuildOptions) -> dict:
    """model.onnx (FP32) and, as asked, model.fp16.onnx (FP32 islands) and model.int8.onnx (Q/DQ)."""

    from sls_deploy.onnx.precision.fp16 import to_fp16
    from sls_deploy.onnx.precision.int8 import quantize_int8, quantized_inputs, read_calibration_images

    plan = Plan.load(bundle.path(PLAN))
    po = precision_options(recipe, opts)
    for g in po.graphs:
        if g not in PRECISIONS:
            raise UsageError(f"unknown precision '{g}' (known: {', '.join(PRECISIONS)})")
    images, hashes = [], {}
    if "int8" in po.graphs:  # read (and reject) calibration images before anything is written
        images, hashes = read_calibration_images(po.calib, recipe.adapter.min_input_size(recipe.model))
    inputs = digest({"weights": atomic.sha256_file(bundle.path(WEIGHTS)), "plan": atomic.sha256_file(bundle.path(PLAN)),
                     "opset": recipe.opset, "precision": {**po.__dict__, "calib": hashes}})
    if bundle.stage_is_current("export", inputs):
        opts.log("  up to date")
        return bundle.manifest()["stages"]["export"].get("result", {})
    t0 = time.perf_counter()
    model = load_model(recipe, bundle.path(WEIGHTS))
    spec = dataclasses.replace(recipe.adapter.export_spec(recipe.model), opset=recipe.opset)
    example = recipe.adapter.example_input(recipe.model, 32, 32)
    staged = bundle.work / "fp32.onnx"  # the FP32 graph takes its final name only once every check passed
    export_onnx(recipe.adapter.export_module(model), spec, example, staged)
    try:
        fp32 = load_onnx(staged)
        graphs = {"fp32": fp32}
        info: dict[str, Any] = {"opset": recipe.opset, "graphs": {}, "fp32_islands": plan.fp32_islands}
        if "fp16" in po.graphs:
            graphs["fp16"] = to_fp16(fp32, plan.fp32_islands, io_fp16=po.io == "fp16")
        if "int8" in po.graphs:
            q_inputs = quantized_inputs(fp32, plan.fp32_islands)
            amax, reused = _calibration(bundle, fp32, q_inputs, images, hashes, po, atomic.sha256_file(staged))
            graphs["int8"] = quantize_int8(fp32, amax, plan.fp32_islands)
            info["calibration"] = {"method": po.calib_method, "percentile": po.percentile, "images": len(images),
                                   "folder": str(po.calib), "cache": CALIB_CACHE, "reused_cache": reused}
        layers = [(l.name, l.n, l.m) for l in plan.layers]
        for name, g in graphs.items():
            checks = verify_plan_in_graph(g, layers)
            bad = [k for k, c in checks.items() if not c["nm"]]
            if bad:
                raise ValidationError(f"layer '{bad[0]}' lost its {plan.layer(bad[0]).n}:{plan.m} pattern in the "
                                      f"{name} graph")
            lost = [l.name for l in plan.layers if l.sparse_2to4 and not checks[l.name]["2to4"]]
            if lost:
                raise ValidationError(f"layer '{lost[0]}' is planned 2:4 but is not 2:4 in the {name} graph")
            _ort_smoke(g, name)
            info["graphs"][name] = {"file": GRAPH_FILES[name], "layers_nm": len(checks),
                                    "layers_2to4": sum(c["2to4"] for c in checks.values())}
        for name, g in graphs.items():
            if name != "fp32":
                atomic.write_bytes(bundle.path(GRAPH_FILES[name]), g.SerializeToString())
        os.replace(staged, bundle.path(ONNX))
    finally:
        if staged.exists():
            staged.unlink()
    info.update(layers_nm=info["graphs"]["fp32"]["layers_nm"], layers_2to4=info["graphs"]["fp32"]["layers_2to4"])
    outputs = [GRAPH_FILES[g] for g in graphs] + ([CALIB_CACHE] if "int8" in graphs else [])
    bundle.record_stage("export", inputs, outputs, time.perf_counter() - t0, {"result": info})
    return info


def _ort_smoke(model, name: str) -> None:
    """ONNX Runtime on CPU must load and run the graph (a 16x16 input)."""
    import numpy as np
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        sess.run(None, {inp.name: np.random.default_rng(0).random((1, 3, 16, 16)).astype(dtype)})
    except Exception as e:
        raise ValidationError(f"ONNX Runtime cannot run the {name} graph: {str(e).splitlines()[0]}") from None


# -- build ------------------------------------------------------------------------------------------------
def default_out(model_name: str, budget: float) -> Path:
    return Path("runs") / f"{model_name}-b{budget:.2f}"


def open_bundle(root: Path) -> tuple[Bundle, Recipe]:
    bundle = Bundle(root)
    bundle.require()
    return bundle, load_recipe(bundle.path(RECIPE))


def restore_options(opts, recorded: dict, keys, overrides: dict):
    """``opts`` with what the bundle was built with (``recorded`` options among ``keys``), then ``overrides``."""
    for k in keys:
        if recorded.get(k) is not None:
            setattr(opts, k, recorded[k])
    for k, v in overrides.items():
        if v is not None:
            setattr(opts, k, v)
    return opts


def options_from_bundle(bundle: Bundle, **overrides) -> BuildOptions:
    m = bundle.require()
    key = m["build_key"]
    return restore_options(BuildOptions(budget=key["budget"], method=key["method"], m=key["m"]),
                           m.get("options", {}), ("seed", "weights", "data", "steps", "n", "lam", "alpha", "target",
                                                  "precisions", "calib", "calib_method", "io"), overrides)


def build(recipe: Recipe, opts: BuildOptions, out: Path) -> dict:
    """All stages into ``out``. Under torchrun every rank searches and finetunes; rank 0 alone writes files,
    exports and validates (the other ranks return an empty report)."""
    from sls_deploy.stages.validate import run_validate

    check_options(recipe, opts)
    bundle = Bundle(out)
    if dist.is_main():
        bundle.claim(build_key(recipe, opts), Path(recipe.path).read_text(), options_record(opts))
    dist.barrier()
    log = opts.log if dist.is_main() else (lambda msg: None)
    opts.log = log
    stages = [("search", lambda: run_search(bundle, recipe, opts)),
              ("finetune", lambda: run_finetune(bundle, recipe, opts)),
              ("export", lambda: run_export(bundle, recipe, opts)),
              ("validate", lambda: run_validate(bundle, recipe, opts))]
    t_all = time.perf_counter()
    rep: dict = {}
    for i, (name, fn) in enumerate(stages, 1):
        if name in ("export", "validate") and not dist.is_main():
            return {}
        t0 = time.perf_counter()
        log(f"[{i}/{len(stages)}] {name} ...")
        result = fn()
        if name == "search":
            ns = sorted({l.n for l in result.layers})
            log(f"  plan: {result.method}, N in {ns} of M={result.m} over {len(result.layers)} layers, "
                f"MACs {result.macs_pruned / 1e9:.2f} / {result.macs_dense / 1e9:.2f} G (ratio {result.ratio:.3f})")
        if name == "validate":
            rep = result
        log(f"  {name} done in {time.perf_counter() - t0:.1f}s")
    log(f"build finished in {time.perf_counter() - t_all:.1f}s -> {out}")
    return rep
