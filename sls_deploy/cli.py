"""The `sls-deploy` command line. Every command has --help; every user error is one line on stderr.

Exit codes: 0 success, 1 a failed check or bad file, 2 a usage error (bad option value), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sls_deploy import __version__
from sls_deploy.core.errors import SlsError, UsageError, ValidationError

BUDGET = click.FloatRange(0.0, 1.0, min_open=True)
IMAGE_METHODS = ("sls", "oneshot", "srste")  # N:M planners (image models)
STRUCTURED_METHODS = ("ssl", "l1", "l1-global")  # = recipe.STRUCTURED_METHODS, not imported: --help stays fast


def _recipe_options(f):
    f = click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
                     help="Recipe YAML file (instead of --model).")(f)
    f = click.option("--model", "model_name", help="Built-in model recipe, e.g. 'edsr' (recipes/edsr.yaml).")(f)
    return f


def _plan_options(f):
    f = click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling and planning.")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False),
                     help="Base (dense) weights: .safetensors, BasicSR .pth or official EDSR .pt. "
                          "Default: the recipe's shipped weights.")(f)
    f = click.option("--m", "m", type=click.Choice(["4", "8", "16", "32"]), default=None,
                     help="Group size M of N:M sparsity (default: the recipe's, 4 for EDSR).")(f)
    f = click.option("--target", type=click.Choice(["trt", "none"]), default=None,
                     help="trt (default): the plan states per layer whether it runs on TensorRT's 2:4 sparse kernels "
                          "(N <= 2 of M = 4) or dense, and reports give the 2:4-accelerated MAC bound.")(f)
    f = click.option("--n", "n", type=int, help="oneshot/srste: a fixed uniform N (1..M) instead of the largest "
                     "N within the budget.")(f)
    f = click.option("--alpha", type=float, help="SLS: growth of the budget-loss coefficient when the "
                     "compression stalls (>= 1; default: the recipe's, 1.1 as the paper).")(f)
    f = click.option("--lam", "lam", type=float, help="SLS: lambda of the budget loss (>= 0; default: the "
                     "recipe's, 1e-10 as the paper).")(f)
    f = click.option("--method", type=click.Choice(IMAGE_METHODS + STRUCTURED_METHODS), default=None,
                     help="Planner. Image models (N:M; default: the recipe's sparsity.method, sls for EDSR): sls = "
                          "layer-wise N:M search (SLS); oneshot = uniform magnitude N:M (the SLS paper's baseline); "
                          "srste = uniform N:M finetuned with SR-STE. Video models (channel pruning; default: the "
                          "recipe's structured.method, ssl): ssl = learned channel scales with a growing penalty; "
                          "l1 = uniform L1-norm channel pruning; l1-global = one global L1-norm threshold.")(f)
    f = click.option("--budget", required=True, type=BUDGET,
                     help="Fraction of the dense model's MACs (whole model, reference resolution) to keep, in (0, 1].")(f)
    return f


def _video_options(f):
    f = click.option("--temporal-weight", type=click.FloatRange(min=0.0),
                     help="Video: weight of the temporal term of the finetuning loss (L1 of frame-to-frame "
                          "differences; 0 = per-frame L1; default: the recipe's structured.temporal_weight).")(f)
    f = click.option("--round-to", type=click.IntRange(min=1),
                     help="Video: kept channels per group are a multiple of this, or the full width (default: the "
                          "recipe's structured.round_to, 8).")(f)
    return f


def _model_kind(recipe, method: str | None, video_only: dict, image_only: dict) -> bool:
    """True for a video recipe (channel pruning); options of the other kind are usage errors naming them."""
    video = recipe.adapter.kind() == "video"
    wrong_method = IMAGE_METHODS if video else STRUCTURED_METHODS
    if method in wrong_method:
        raise UsageError(f"--method {method} does not apply to {recipe.describe_model()}: "
                         + ("video models take ssl, l1 or l1-global (channel pruning)" if video
                            else "ssl, l1 and l1-global are for video models; image models take sls, oneshot or srste"))
    given = [name for name, v in (image_only if video else video_only).items() if v not in (None, ())]
    if given:
        raise UsageError(f"{given[0]} does not apply to {recipe.describe_model()}: it is "
                         + ("an N:M option (video models are channel-pruned)" if video else "an option of video models"))
    return video


def _precision_options(f):
    f = click.option("--calib-method", type=click.Choice(["max", "percentile", "entropy"]),
                     help="INT8 activation calibration (default: the recipe's, percentile 99.99).")(f)
    f = click.option("--calib", type=click.Path(), help="Folder of LR calibration images for INT8 "
                     "(default: the recipe's, the calib/ set shipped with the package).")(f)
    f = click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
                     help="Graphs to write (repeatable): model.onnx (always), model.fp16.onnx, model.int8.onnx. "
                          "Default: the recipe's (all three).")(f)
    return f


def _progress_option(f):
    return click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")(f)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sls-deploy")
def cli() -> None:
    """Sparse (N:M) deployment of image/video restoration networks: search -> finetune -> export -> validate."""


@cli.command()
@_recipe_options
@_plan_options
@_video_options
@click.option("--data", help="Training data for finetune: a folder of HR images, or for video models of clips "
              "(default: the recipe's list).")
@click.option("--eval-data", help="Eval data: a folder of HR images or clips (default: the recipe's eval list).")
@click.option("--steps", type=click.IntRange(min=0), help="Finetune steps (default: the recipe's).")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-b<budget>).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@_precision_options
@_progress_option
def build(model_name, recipe_path, budget, method, lam, alpha, n, target, m, weights, seed, round_to, temporal_weight,
          data, eval_data, steps, out, as_json, precisions, calib, calib_method, no_progress):
    """Plan, finetune, export and validate: the whole pipeline into one bundle folder.

    Re-running the same command resumes an interrupted build (finished stages are skipped, finetune continues
    from its last checkpoint).
    """
    from sls_deploy.stages.pipeline import BuildOptions, build as run_build, default_out
    from sls_deploy.stages.validate import check_report
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.report.document import summary_text

    recipe = resolve_recipe(model_name, recipe_path)
    video = _model_kind(recipe, method, {"--round-to": round_to, "--temporal-weight": temporal_weight},
                        {"--m": m, "--n": n, "--lam": lam, "--alpha": alpha, "--target": target,
                         "--precision": precisions, "--calib": calib, "--calib-method": calib_method})
    out_dir = Path(out) if out else default_out(model_name or Path(recipe_path).stem, budget)
    if video:
        from sls_deploy.stages.video_pipeline import VideoBuildOptions, build as run_video_build

        rep = run_video_build(recipe, VideoBuildOptions(
            budget=budget, method=method, round_to=round_to, temporal_weight=temporal_weight, weights=weights,
            data=data, eval_data=eval_data, steps=steps, seed=seed, progress=not no_progress, log=_log), out_dir)
    else:
        opts = BuildOptions(budget=budget, method=method or recipe.sparsity_method, m=int(m) if m else None, n=n,
                            target=target or "trt", lam=lam, alpha=alpha, weights=weights, data=data,
                            eval_data=eval_data, steps=steps, seed=seed, precisions=tuple(precisions) or None,
                            calib=calib, calib_method=calib_method, progress=not no_progress, log=_log)
        rep = run_build(recipe, opts, out_dir)
        if not rep:  # a non-zero rank of a torchrun job: rank 0 reports
            return
    click.echo(json.dumps(rep, indent=2) if as_json else summary_text(rep))
    check_report(rep)


@cli.command()
@_recipe_options
@click.option("--out", type=click.Path(dir_okay=False), help="Weights file to write (.safetensors). "
              "Default: runs/<recipe name>.safetensors")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps (default: the recipe's train.steps).")
@click.option("--data", help="Folder of HR training images (default: the recipe's train list).")
@click.option("--fp16", is_flag=True, help="Store the weights in FP16 (half the size; used for shipped weights).")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint and start from scratch.")
@click.option("--seed", default=0, show_default=True, type=int)
@_progress_option
def train(model_name, recipe_path, out, steps, data, fp16, restart, seed, no_progress):
    """Train the recipe's dense model from scratch (the base weights that `build` starts from)."""
    from sls_deploy.training.base import train_base
    from sls_deploy.config.recipe import resolve_recipe

    recipe = resolve_recipe(model_name, recipe_path)
    out_path = Path(out) if out else Path("runs") / f"{recipe.name}.safetensors"
    res = train_base(recipe, out_path, steps=steps, data=data, resume=not restart, half=fp16, seed=seed,
                     progress=not no_progress)
    ch = res["channel"].upper()
    click.echo(f"wrote {res['weights']} after {res['steps']} steps ({res['seconds']:.0f}s)")
    click.echo(f"eval PSNR-{ch}: model {res['psnr_model']:.2f} dB, bicubic {res['psnr_bicubic']:.2f} dB, "
               f"margin {res['margin_db']:+.2f} dB")


@cli.command()
@_recipe_options
@_plan_options
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-b<budget>).")
@_video_options
@click.option("--data", help="Training images for the SLS search, or clips for the ssl search (default: the "
              "recipe's list).")
@click.option("--steps", type=click.IntRange(min=0), help="Search + finetune steps (default: the recipe's).")
@_progress_option
def search(model_name, recipe_path, budget, method, lam, alpha, n, target, m, weights, seed, round_to,
           temporal_weight, out, data, steps, no_progress):
    """Only plan: write plan.json (one entry per prunable layer, or per channel group for video models) into a
    new or matching bundle."""
    from sls_deploy.core import distributed as dist
    from sls_deploy.core.bundle import Bundle
    from sls_deploy.stages.pipeline import BuildOptions, build_key, check_options, default_out, options_record, run_search
    from sls_deploy.config.recipe import resolve_recipe

    recipe = resolve_recipe(model_name, recipe_path)
    video = _model_kind(recipe, method, {"--round-to": round_to, "--temporal-weight": temporal_weight},
                        {"--m": m, "--n": n, "--lam": lam, "--alpha": alpha, "--target": target})
    out_dir = Path(out) if out else default_out(model_name or Path(recipe_path).stem, budget)
    if video:
        from sls_deploy.stages import video_pipeline as vp

        vopts = vp.VideoBuildOptions(budget=budget, method=method, round_to=round_to, temporal_weight=temporal_weight,
                                     weights=weights, data=data, steps=steps, seed=seed, progress=not no_progress,
                                     log=_log)
        vp.check_options(recipe, vopts)
        bundle = Bundle(out_dir)
        bundle.claim(vp.build_key(recipe, vopts), Path(recipe.path).read_text(), vp.options_record(vopts))
        vplan = vp.run_search(bundle, recipe, vopts)
        click.echo(f"{out_dir / 'plan.json'}: {vplan.method}, widths "
                   f"{', '.join(f'{g.name}={g.kept_units}/{g.dense_units}' for g in vplan.groups)}, "
                   f"MACs ratio {vplan.ratio:.3f}")
        return
    opts = BuildOptions(budget=budget, method=method or recipe.sparsity_method, m=int(m) if m else None, n=n,
                        target=target or "trt", lam=lam, alpha=alpha, weights=weights, seed=seed, data=data,
                        steps=steps, progress=not no_progress, log=_log)
    check_options(recipe, opts)
    bundle = Bundle(out_dir)
    if dist.is_main():
        bundle.claim(build_key(recipe, opts), Path(recipe.path).read_text(), options_record(opts))
    dist.barrier()
    plan = run_search(bundle, recipe, opts)
    if not dist.is_main():
        return
    ns = sorted({l.n for l in plan.layers})
    click.echo(f"{out_dir / 'plan.json'}: {plan.method}, {len(plan.layers)} layers at N in {ns} of M={plan.m}, "
               f"MACs ratio {plan.ratio:.3f} (2:4-accelerated bound {plan.trt_2to4_ratio:.3f})")


@cli.command("import-sls")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_recipe_options
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Dense weights for a plain {layer: mask} file (default: the recipe's shipped weights).")
@click.option("--m", "m", type=click.Choice(["4", "8", "16", "32"]), default=None,
              help="Group size of a plain mask file (SLS checkpoints carry their own).")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-imported).")
def import_sls(checkpoint, model_name, recipe_path, weights, m, out):
    """Import masks searched elsewhere: an SLS checkpoint (<layer>.weight, .priority_scores, .pruning_units)
    or a {layer: mask} safetensors file. Writes plan.json and the masked weights; continue with
    `sls-deploy finetune BUNDLE`, `export`, `validate`."""
    from sls_deploy.stages.pipeline import run_import
    from sls_deploy.config.recipe import resolve_recipe

    recipe = resolve_recipe(model_name, recipe_path)
    out_dir = Path(out) if out else Path("runs") / f"{model_name or Path(recipe_path).stem}-imported"
    plan = run_import(recipe, Path(checkpoint), out_dir, weights, int(m) if m else None)
    ns = sorted({l.n for l in plan.layers})
    click.echo(f"{out_dir}: imported {plan.search['imported_layers']} masked layers, N in {ns} of M={plan.m}, "
               f"MACs ratio {plan.ratio:.3f}; next: sls-deploy finetune {out_dir}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(min=0), help="Finetune steps (default: the recipe's).")
@click.option("--data", help="Folder of HR training images (default: the recipe's train list).")
@click.option("--resume", "resume", flag_value=True, default=None, help="Continue an interrupted finetune.")
@click.option("--restart", "resume", flag_value=False, help="Discard an interrupted finetune's checkpoint.")
@_progress_option
def finetune(bundle_dir, steps, data, resume, no_progress):
    """Masked finetuning of a bundle's plan (pruned weights stay exactly zero) -> model.safetensors."""
    from sls_deploy.stages.pipeline import finetune_checkpoint, open_bundle, options_from_bundle, run_finetune

    bundle, recipe = open_bundle(Path(bundle_dir))
    if recipe.adapter.kind() == "video":
        from sls_deploy.stages import video_pipeline as vp

        vopts = vp.options_from_bundle(bundle, steps=steps, data=data, progress=not no_progress, log=_log)
        if resume is False and (bundle.work / "finetune.ckpt").exists():  # --restart
            (bundle.work / "finetune.ckpt").unlink()
        info = vp.run_finetune(bundle, recipe, vopts, resume=bool(resume))
        click.echo(f"finetuned {info.get('steps')} steps -> {bundle.path('model.safetensors')}")
        return
    opts = options_from_bundle(bundle, steps=steps, data=data, progress=not no_progress, log=_log)
    ckpt = finetune_checkpoint(bundle)
    if resume is False and ckpt.exists():  # --restart
        ckpt.unlink()
    info = run_finetune(bundle, recipe, opts, resume=bool(resume))
    from sls_deploy.core import distributed as dist

    if not dist.is_main():
        return
    click.echo(f"finetuned {info.get('steps')} steps -> {bundle.path('model.safetensors')}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@_precision_options
@click.option("--io", type=click.Choice(["fp32", "fp16"]), help="Input/output dtype of the FP16 graph "
              "(default: the recipe's, fp32).")
def export(bundle_dir, precisions, calib, calib_method, io):
    """Export ONNX graphs (opset >= 17, dynamic N/H/W): FP32, FP16 with FP32 islands, INT8 with Q/DQ.

    Every graph passes onnx.checker, keeps every planned N:M / 2:4 pattern (checked through Cast and
    DequantizeLinear) and runs in ONNX Runtime; nothing takes a final name unless all of that holds.
    """
    from sls_deploy.stages.pipeline import open_bundle, options_from_bundle, run_export

    bundle, recipe = open_bundle(Path(bundle_dir))
    if _model_kind(recipe, None, {}, {"--precision": precisions, "--calib": calib, "--calib-method": calib_method,
                                      "--io": io}):
        from sls_deploy.stages import video_pipeline as vp
        from sls_deploy.stages.video_export import run_export as run_video_export

        info = run_video_export(bundle, recipe, vp.options_from_bundle(bundle, log=_log))
        click.echo(f"{bundle.path('model.onnx')}: FP32 {info['graph']} graph, {info['narrower_convs']} narrower "
                   f"convs, the dense graph's op types")
        return
    opts = options_from_bundle(bundle, precisions=tuple(precisions) or None, calib=calib,
                               calib_method=calib_method, io=io, log=_log)
    info = run_export(bundle, recipe, opts)
    for name, g in info["graphs"].items():
        click.echo(f"{bundle.path(g['file'])}: {g['layers_nm']} layers keep their N:M pattern, "
                   f"{g['layers_2to4']} are 2:4")


@cli.command()
@click.argument("bundle_path", type=click.Path())
@click.option("--eval-data", help="Eval images: a folder of HR images (default: the recipe's eval list, or the "
              "val/ images of a packed bundle).")
@click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), default="ort", show_default=True,
              help="ort: every ONNX graph (FP32/FP16/INT8) in ONNX Runtime vs the PyTorch reference; torch: the "
                   "PyTorch model alone (quality and latency); trt: the bundle's TensorRT engine vs the FP32 graph. "
                   "ort and torch write report.json/md/html.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True,
              help="With --backend trt: which graph the engine was built from.")
@click.option("--latency-runs", type=click.IntRange(min=1), help="Timed runs per model and size "
              "(default: the recipe's validate.latency_runs).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads for latency "
              "(default: every core).")
@click.option("--no-latency", is_flag=True, help="Skip the dense-vs-pruned latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the summary.")
@_progress_option
def validate(bundle_path, eval_data, backend, precision, latency_runs, threads, no_latency, as_json, no_progress):
    """Does a bundle ship? Accuracy at the engine profile's min/opt/max and an odd size against the PyTorch
    reference and the ground truth (thresholds per precision from the recipe), dense-vs-pruned latency side by
    side, and report.md / report.html with plots. Exits 1 naming the first failed check."""
    from sls_deploy.stages.pipeline import open_bundle, options_from_bundle
    from sls_deploy.report.document import summary_text
    from sls_deploy.stages.validate import ValidateOptions, check_report, run_validate

    if backend == "trt":
        from sls_deploy.trt.engine import require_tensorrt
        from sls_deploy.stages.validate_engine import validate_engine

        require_tensorrt()  # before anything is read or written
        root, recipe = _device_bundle(Path(bundle_path))
        if recipe.adapter.kind() == "video":
            raise UsageError("--backend trt is not available for video bundles (use ort)")
        res = validate_engine(root, recipe, precision, Path(eval_data) if eval_data else None, runs=latency_runs)
        click.echo(json.dumps(res, indent=2))
        if not res["passed"]:
            raise ValidationError(res["verdict"])
        return
    bundle, recipe = open_bundle(Path(bundle_path))
    vopts = ValidateOptions(backend=backend, latency=not no_latency, latency_runs=latency_runs, threads=threads)
    if recipe.adapter.kind() == "video":
        from sls_deploy.stages import video_pipeline as vp
        from sls_deploy.stages.video_validate import run_validate as run_video_validate

        rep = run_video_validate(bundle, recipe, vp.options_from_bundle(bundle, eval_data=eval_data, log=_log,
                                                                        progress=not no_progress), vopts)
    else:
        rep = run_validate(bundle, recipe, options_from_bundle(bundle, eval_data=eval_data, log=_log,
                                                               progress=not no_progress), vopts)
    click.echo(json.dumps(rep, indent=2) if as_json else summary_text(rep))
    check_report(rep)


def _device_bundle(path: Path):
    """A bundle folder or a packed .tar.gz (unpacked beside it), hash-checked; returns (root, recipe)."""
    from sls_deploy.core.bundle import Bundle
    from sls_deploy.core.errors import BundleError
    from sls_deploy.core.packing import PACK_MANIFEST, unpack, verify_packed
    from sls_deploy.config.recipe import load_recipe

    if path.is_file():
        root = unpack(path)
    elif (path / PACK_MANIFEST).is_file():
        root = path
        verify_packed(root)
    else:
        root = path
        bundle = Bundle(root)
        names = [n for n in bundle.require().get("files", {}) if n.endswith((".onnx", ".json")) and n != "report.json"]
        bundle.verify(names)
    if not (root / "recipe.yaml").is_file():
        raise BundleError(f"{root} is not a bundle (no recipe.yaml)")
    return root, load_recipe(root / "recipe.yaml")


@cli.command()
@click.argument("bundle_path", type=click.Path())
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True,
              help="Which graph to build: model.onnx, model.fp16.onnx or model.int8.onnx.")
@click.option("--sparsity", type=click.Choice(["enable", "disable"]), default="enable", show_default=True,
              help="TensorRT's SPARSE_WEIGHTS flag (2:4 layers may then use sparse tactics). disable builds the "
                   "dense baseline engine/model.dense.plan that `validate --backend trt` times the sparse one "
                   "against.")
@click.option("--workspace-mb", type=click.IntRange(min=1), help="Workspace limit (default: the recipe's).")
@click.option("--dry-run", is_flag=True, help="Print the settings and the equivalent trtexec / polygraphy "
              "command lines and write engine/build.json; needs no TensorRT.")
def engine(bundle_path, precision, sparsity, workspace_mb, dry_run):
    """Build a TensorRT engine from a bundle (folder or packed .tar.gz) on this machine, with Polygraphy.

    Writes engine/model.plan, the build log, the inspector JSON, the timing cache and engine/layers.json
    (per plan layer: 2:4 weights, TensorRT-eligible, sparse tactic picked). Refuses a bundle whose files do not
    match their recorded sha256.
    """
    from sls_deploy.trt.engine import build_engine, dry_run as do_dry_run, engine_settings, require_tensorrt
    from sls_deploy.core.errors import BundleError

    if not dry_run:
        require_tensorrt()  # one line, nothing written
    root, recipe = _device_bundle(Path(bundle_path))
    settings = engine_settings(recipe, precision, sparsity, workspace_mb)
    if not (root / settings.graph).is_file():
        raise BundleError(f"{root} has no {settings.graph} (run `sls-deploy export {root} --precision {precision}`)")
    if dry_run:
        info = do_dry_run(root, settings)
        click.echo(f"# {info['path']}")
        click.echo(info["trtexec"])
        click.echo(info["polygraphy"])
        click.echo(f"# settings written to {root / 'engine' / 'build.json'}")
        return
    plan = json.loads((root / "plan.json").read_text())
    info = build_engine(root, settings, plan["layers"])
    click.echo(f"engine {root / settings.engine_file} built in {info['seconds']}s ({info['path']}); "
               f"per-layer sparsity in {root / 'engine' / 'layers.json'}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Tar file (default <bundle>.tar.gz).")
def pack(bundle_dir, out):
    """Pack what a device needs (graphs, plan, recipe, manifest, calibration cache, eval images) into a tar."""
    from sls_deploy.data import resolve_images
    from sls_deploy.core.packing import pack as do_pack
    from sls_deploy.stages.pipeline import open_bundle

    bundle, recipe = open_bundle(Path(bundle_dir))
    dest = Path(out) if out else bundle.root.with_name(bundle.root.name + ".tar.gz")
    do_pack(bundle.root, dest, resolve_images(recipe.data_eval), recipe.opset, recipe.digest())
    click.echo(f"wrote {dest}")


@cli.command()
@click.argument("target", type=click.Path())
@click.option("--size", help="LR input size HxW at which to count MACs, e.g. 180x320 (default: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def inspect(target, size, as_json):
    """Per-layer op, weight shape, precision, 2:4 status (through DequantizeLinear and Cast) and MACs of any
    ONNX model, or of a bundle's model.onnx."""
    from sls_deploy.onnx.export import load_onnx
    from sls_deploy.onnx.inspect import inspect_model, parse_size, render, resolve_target

    hw = parse_size(size)
    rows = inspect_model(load_onnx(resolve_target(Path(target))), hw)
    click.echo(json.dumps(rows, indent=2) if as_json else render(rows, hw))


def main(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode so every error is a single line.

    Under torchrun (WORLD_SIZE > 1) it joins the process group first; see sls_deploy/distributed.py.
    """
    from sls_deploy.core import distributed as dist

    try:
        dist.init_from_env()
        rv = cli.main(args=argv, prog_name="sls-deploy", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume from the last checkpoint", err=True)
        return 130
    except SlsError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    finally:
        dist.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
