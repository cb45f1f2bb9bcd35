"""The `sls-deploy` command line. Every command has --help; every user error is one line on stderr.

Exit codes: 0 success, 1 a failed check or bad file, 2 a usage error (bad option value), 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import click

from sls_deploy import __version__
from sls_deploy.core.errors import SlsError, ValidationError, one_line
from sls_deploy.core.numbers import MAX_COUNT, MAX_LATENCY_RUNS, MAX_SIDE, MAX_STEPS, MAX_WORKSPACE_MB
from sls_deploy.core.vocabulary import (BACKENDS, CALIB_METHODS, CHANNEL_METHODS, IO_DTYPES, NM_METHODS, ORT, PRECISIONS,
                                        SELECTIONS, TARGETS, TORCH, TRT)
from sls_deploy.pruning.target import TARGET_HELP

BUDGET = click.FloatRange(0.0, 1.0, min_open=True)
SEED = click.IntRange(0, 2**31 - 1)
STEPS = click.IntRange(0, MAX_STEPS)  # the recipe's cap: a number no run finishes is a usage error, not an ETA


def _recipe_options(f):
    f = click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
                     help="Recipe YAML file (instead of --model).")(f)
    f = click.option("--model", "model_name", help="Built-in model recipe, e.g. 'edsr' (recipes/edsr.yaml).")(f)
    return f


def _plan_options(f, many: bool = False):
    f = click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for sampling and planning.")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False),
                     help="Base (dense) weights: .safetensors, BasicSR .pth or official EDSR .pt. "
                          "Default: the recipe's shipped weights.")(f)
    f = click.option("--m", "m", type=click.Choice(["4", "8", "16", "32"]), default=None,
                     help="Group size M of N:M sparsity (default: the recipe's, 4 for EDSR).")(f)
    f = click.option("--target", type=click.Choice(list(TARGETS)), default=None,
                     help=TARGET_HELP + " Default: the recipe's sparsity.target (trt).")(f)
    f = click.option("--n", "n", type=int, help="oneshot/srste: a fixed uniform N (1..M) instead of the largest "
                     "N within the budget.")(f)
    f = click.option("--alpha", type=float, help="SLS: growth of the budget-loss coefficient when the "
                     "compression stalls (>= 1; default: the recipe's, 1.1 as the paper; the public code uses 1.2).")(f)
    f = click.option("--lam", "lam", type=float, help="SLS: lambda of the budget loss (>= 0; default: the "
                     "recipe's, 1e-10 as the paper).")(f)
    f = click.option("--method", type=click.Choice(NM_METHODS + CHANNEL_METHODS), default=None,
                     help="Pruning method (default: the recipe's). N:M strategy, masks on weights: sls = "
                          "layer-wise N:M search (SLS); oneshot = uniform magnitude N:M (the SLS paper's baseline); "
                          "srste = uniform N:M finetuned with SR-STE. Channel strategy, the adapter's channel groups "
                          "sliced: ssl = learned channel scales with a growing penalty; l1 = uniform L1-norm channel "
                          "pruning; l1-global = one global L1-norm threshold; hybrid = ssl channels, then 2:4 on the "
                          "narrower layers the --target accelerates (none on 64-channel models: it says so). Any "
                          "method runs on any modality.")(f)
    f = click.option("--budget", required=True, type=BUDGET, multiple=many,
                     help="Fraction of the dense model's MACs (whole model, reference resolution) to keep, in (0, 1]."
                     + (" Repeat it (--budget 0.25 --budget 0.4 --budget 0.6) to build a family: one bundle per "
                        "budget from the same base, in one folder (default runs/<model>-family), for "
                        "`sls-deploy route`." if many else ""))(f)
    return f


def _build_plan_options(f):
    return _plan_options(f, many=True)


def _video_options(f):
    f = click.option("--frame-diff-weight", "--temporal-weight", "temporal_weight", type=click.FloatRange(min=0.0),
                     help="Clip/step (video) models: weight of the frame-difference term of the training loss "
                          "(this project's own term, L1 of frame-to-frame differences, not SSL's Temporal "
                          "Finetuning; 0 = per-frame L1; default: the recipe's structured.temporal_weight). "
                          "--temporal-weight is its old name.")(f)
    f = click.option("--tf-weight", "tf_weight", type=click.FloatRange(min=0.0),
                     help="Clip/step (video) models: temporal finetuning, weight of the L1 distance between the "
                          "pruned and the dense model's hidden states at every time step during finetuning "
                          "(0 = off; default: the recipe's structured.tf_weight).")(f)
    f = click.option("--keep-full", "keep_full", multiple=True, metavar="GROUP",
                     help="Channel methods: keep this channel group at full width (repeatable; shell patterns "
                          "allowed), e.g. --keep-full stream keeps EDSR's residual stream whole and prunes only block "
                          "inner channels and the upsampler; --keep-full '*.read' --keep-full '*.write' turns off "
                          "the video models' Residual Sparsity Connections; --keep-full none prunes every group "
                          "(default: the recipe's structured.keep_full; EDSR's: stream).")(f)
    f = click.option("--selection", type=click.Choice(list(SELECTIONS)), default=None,
                     help="ssl/hybrid: how the kept widths are chosen under the budget: one threshold on per-group "
                          "normalised |learned scale| (normalised), on the raw |scale| of every unit (raw, as SSL's "
                          "public code), or on each unit's Fisher saliency per MAC saved, measured on the base model "
                          "before any training (fisher: Hessian-aware, compares groups on the loss's scale; the "
                          "units it drops are then driven to 0 by ssl's penalty), or on group Taylor importance "
                          "|w * dL/dw| per MAC saved (taylor: first order, one backward pass per batch) (default: "
                          "the recipe's "
                          "structured.selection, normalised).")(f)
    f = click.option("--round-to", type=click.IntRange(1, MAX_COUNT),
                     help="Channel methods: kept channels per group are a multiple of this, or the full width "
                          "(default: the recipe's structured.round_to, 8).")(f)
    return f


def _distill_options(f):
    f = click.option("--feature-distill-weight", "feature_distill_weight", type=click.FloatRange(min=0.0),
                     help="Finetuning: weight of the L1 distance between the pruned and the dense model's residual "
                          "stream features (EDSR: every residual block's output; needs the stream kept full width; "
                          "0 = off; default: the recipe's distill.feature_weight).")(f)
    f = click.option("--distill-weight", "distill_weight", type=click.FloatRange(min=0.0),
                     help="Finetuning: weight of the L1 distance between the pruned and the dense model's outputs "
                          "(the dense base model as teacher; 0 = off; default: the recipe's "
                          "distill.weight).")(f)
    return f


def _settings(recipe, budget, method, **cli):
    """Settings resolved once from the recipe and the command line (one-line usage errors)."""
    from sls_deploy.config.settings import Settings

    if cli.get("m") is not None:
        cli["m"] = int(cli["m"])
    if cli.get("precisions") == ():
        cli["precisions"] = None
    return Settings.resolve(recipe, budget=budget, method=method, **cli)


def _precision_options(f):
    f = click.option("--calib-method", type=click.Choice(CALIB_METHODS),
                     help="INT8 activation calibration (default: the recipe's, percentile 99.99).")(f)
    f = click.option("--calib", type=click.Path(), help="Folder of LR calibration images for INT8 "
                     "(default: the recipe's, the calib/ set shipped with the package).")(f)
    f = click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
                     help="Graphs to write (repeatable): model.onnx (always), model.fp16.onnx, model.int8.onnx. "
                          "Default: the recipe's (all three).")(f)
    return f


def _progress_option(f):
    return click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")(f)


# = core.device's help text (not imported: --help stays fast)
DEVICE_HELP = ("Where PyTorch trains and evaluates: auto (CUDA when available), cpu, cuda or cuda:N; under "
               "torchrun cuda means cuda:LOCAL_RANK (default: the recipe's compute.device, auto).")


def _device_option(f):
    return click.option("--device", metavar="auto|cpu|cuda|cuda:N", help=DEVICE_HELP)(f)


def _compute_options(f):
    """--device, --amp and --channels-last of the commands that train."""
    f = click.option("--channels-last", "channels_last", type=click.Choice(["off", "on", "cuda"]),
                     help="Train in the channels_last memory format: off, on, or cuda (on for GPU runs only) "
                          "(default: the recipe's compute.channels_last, off; on a 2-core CPU it took 0.73x the step "
                          "time: README).")(f)
    f = click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]),
                     help="Mixed precision of training: bf16 (autocast) or fp16 (autocast with a gradient scaler; "
                          "CUDA only) (default: the recipe's compute.amp, off).")(f)
    return _device_option(f)


def _compute(recipe, device, amp, channels_last):
    """The device / AMP / memory format of a training command, checked before anything is written."""
    from sls_deploy.core.device import resolve_compute

    return resolve_compute(recipe.compute, device=device, amp=amp, channels_last=channels_last)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sls-deploy")
def cli() -> None:
    """Sparse (N:M) deployment of image/video restoration networks: search -> finetune -> export -> validate."""


@cli.command()
@_recipe_options
@_build_plan_options
@_video_options
@click.option("--data", help="Training data for finetune: a folder of HR images, or for video models of clips "
              "(default: the recipe's list).")
@click.option("--eval-data", help="Eval data: a folder of HR images or clips (default: the recipe's eval list).")
@click.option("--steps", type=STEPS, help="Training steps after the base model, search and finetune "
              "together (default: the recipe's finetune.steps); the search (ssl's scale learning, the SLS search) "
              "takes at most three quarters of them, finetuning the rest.")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-b<budget>; "
              "a family: runs/<model>-family).")
@click.option("--nested", is_flag=True, help="A family (several --budget) of channel members that share one weight "
              "set: nested kept units (each member's are a subset of the next larger one's) from one ranking, the "
              "full-width network trained under every member's mask at once for --steps steps, each member that "
              "set sliced (ClassPruning-style).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@_distill_options
@_precision_options
@_compute_options
@_progress_option
def build(model_name, recipe_path, budget, method, lam, alpha, n, target, m, weights, seed, round_to, selection,
          keep_full, tf_weight, temporal_weight, data, eval_data, steps, out, nested, as_json, distill_weight,
          feature_distill_weight, precisions, calib, calib_method, device, amp, channels_last, no_progress):
    """Plan, finetune, export and validate: the whole pipeline into one bundle folder.

    Re-running the same command resumes an interrupted build (finished stages are skipped, finetune continues
    from its last checkpoint).
    """
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.report.document import summary_text
    from sls_deploy.stages.build import build as run_build, default_out, start
    from sls_deploy.stages.validate import check_report

    recipe = resolve_recipe(model_name, recipe_path)
    compute = _compute(recipe, device, amp, channels_last)
    budgets = tuple(budget)
    cli_opts = dict(lam=lam, alpha=alpha, n=n, target=target, m=m, weights=weights, seed=seed, round_to=round_to,
                    selection=selection, keep_full=tuple(keep_full) or None, tf_weight=tf_weight,
                    temporal_weight=temporal_weight, data=data, eval_data=eval_data, steps=steps,
                    distill_weight=distill_weight, feature_distill_weight=feature_distill_weight,
                    precisions=tuple(precisions), calib=calib, calib_method=calib_method)
    name = model_name or Path(recipe_path).stem
    if len(budgets) > 1:
        from sls_deploy.adaptive.family import build_family

        reports = build_family(recipe, budgets, Path(out) if out else Path("runs") / f"{name}-family",
                               lambda b: _settings(recipe, b, method, **cli_opts), _log, not no_progress,
                               nested=nested, compute=compute)
        if not reports:
            return
        click.echo(json.dumps(reports, indent=2) if as_json else
                   "\n\n".join(summary_text(r) for r in reports.values()))
        for r in reports.values():
            check_report(r)
        return
    if nested:
        raise click.UsageError("--nested builds a family: give several --budget values")
    settings = _settings(recipe, budgets[0], method, **cli_opts)
    out_dir = Path(out) if out else default_out(name, budgets[0])
    rep = run_build(start(recipe, settings, out_dir, _log, not no_progress, compute))
    if not rep:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    click.echo(json.dumps(rep, indent=2) if as_json else summary_text(rep))
    check_report(rep)


@cli.command()
@_recipe_options
@click.option("--out", type=click.Path(dir_okay=False), help="Weights file to write (.safetensors). "
              "Default: runs/<recipe name>.safetensors")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), help="Training steps (default: the recipe's "
              "train.steps).")
@click.option("--data", help="Folder of HR training images (default: the recipe's train list).")
@click.option("--fp16", is_flag=True, help="Store the weights in FP16 (half the size; used for shipped weights).")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint and start from scratch.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@_compute_options
@_progress_option
def train(model_name, recipe_path, out, steps, data, fp16, restart, force, seed, device, amp, channels_last,
          no_progress):
    """Train the recipe's dense model from scratch (the base weights that `build` starts from)."""
    from sls_deploy.training.base import train_base
    from sls_deploy.config.recipe import resolve_recipe

    from sls_deploy.core.atomic import refuse_non_regular, remove_stale_temps

    recipe = resolve_recipe(model_name, recipe_path)
    compute = _compute(recipe, device, amp, channels_last)
    out_path = Path(out) if out else Path("runs") / f"{recipe.name}.safetensors"
    _check_output_file(out_path, force)
    refuse_non_regular(out_path.with_name(out_path.name + ".ckpt"), "training checkpoint")
    remove_stale_temps(out_path.parent, names={out_path.name, out_path.name + ".ckpt"})
    res = train_base(recipe, out_path, steps=steps, data=data, resume=not restart, half=fp16, seed=seed,
                     progress=not no_progress, compute=compute)
    if not res:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    ch = res["channel"].upper()
    click.echo(f"wrote {res['weights']} after {res['steps']} steps ({res['seconds']:.0f}s)")
    click.echo(f"eval PSNR-{ch}: model {res['psnr_model']:.2f} dB, {res['baseline']} {res['psnr_baseline']:.2f} dB, "
               f"margin {res['margin_db']:+.2f} dB")


@cli.command()
@_recipe_options
@_plan_options
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-b<budget>).")
@_video_options
@click.option("--data", help="Training images for the SLS search, or clips for the ssl search (default: the "
              "recipe's list).")
@click.option("--steps", type=STEPS, help="Search + finetune steps (default: the recipe's).")
@_compute_options
@_progress_option
def search(model_name, recipe_path, budget, method, lam, alpha, n, target, m, weights, seed, round_to, selection,
           keep_full, tf_weight, temporal_weight, out, data, steps, device, amp, channels_last, no_progress):
    """Only plan: write plan.json (one entry per prunable layer, or per channel group for video models) into a
    new or matching bundle."""
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.core import distributed as dist
    from sls_deploy.pruning.registry import strategy_of
    from sls_deploy.stages.build import default_out, search_or_release, start

    recipe = resolve_recipe(model_name, recipe_path)
    compute = _compute(recipe, device, amp, channels_last)
    settings = _settings(recipe, budget, method, lam=lam, alpha=alpha, n=n, target=target, m=m, weights=weights,
                         seed=seed, round_to=round_to, selection=selection, keep_full=tuple(keep_full) or None,
                         tf_weight=tf_weight, temporal_weight=temporal_weight, data=data, steps=steps)
    out_dir = Path(out) if out else default_out(model_name or Path(recipe_path).stem, budget)
    plan = search_or_release(start(recipe, settings, out_dir, _log, not no_progress, compute))
    if not dist.is_main():
        return
    click.echo(f"{out_dir / 'plan.json'}: {strategy_of(plan).search_line(plan)}")


@cli.command("import-sls")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_recipe_options
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Dense weights for a plain {layer: mask} file (default: the recipe's shipped weights).")
@click.option("--m", "m", type=click.Choice(["4", "8", "16", "32"]), default=None,
              help="Group size of a plain mask file (SLS checkpoints carry their own).")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-imported).")
def import_sls(checkpoint, model_name, recipe_path, weights, m, out):
    """Import masks searched elsewhere: an SLS checkpoint (<layer>.weight, .priority_scores, .pruning_units),
    an NVIDIA ModelOpt sparsified model (mto.save file, or a state dict with <layer>._weight_mask; all-ones
    masks mean dense) or a {layer: mask} safetensors file. Writes plan.json and the masked weights; continue with
    `sls-deploy finetune BUNDLE`, `export`, `validate`."""
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.stages.importing import run_import

    recipe = resolve_recipe(model_name, recipe_path)
    out_dir = Path(out) if out else Path("runs") / f"{model_name or Path(recipe_path).stem}-imported"
    plan = run_import(recipe, Path(checkpoint), out_dir, weights, int(m) if m else None)
    ns = sorted({l.n for l in plan.layers})
    click.echo(f"{out_dir}: imported {plan.search['imported_layers']} masked layers, N in {ns} of M={plan.m}, "
               f"MACs ratio {plan.ratio:.3f}; next: sls-deploy finetune {out_dir}")


@cli.command("import-pruned")
@click.argument("model_file", type=click.Path(dir_okay=False))
@_recipe_options
@click.option("--weights", type=click.Path(dir_okay=False),
              help="The dense checkpoint the model was pruned from (default: the recipe's shipped weights).")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle folder (default runs/<model>-pruned-import).")
@_progress_option
def import_pruned(model_file, model_name, recipe_path, weights, out, no_progress):
    """Import a channel-pruned model made by another tool: Torch-Pruning (torch.save(tp.state_dict(model))),
    NVIDIA ModelOpt FastNAS (mto.save(model, path)) or a narrower model's state dict. Its kept channels are found
    in the dense weights it was pruned from (--weights; import it before the tool's own finetuning) and mapped
    onto the model's channel groups; the residual stream's producers must keep the same channels. A whole
    pickled model (torch.save(model)) is refused unread. Writes plan.json (method imported-channels) and the
    sliced weights; continue with `sls-deploy finetune BUNDLE`, `export`, `validate`."""
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.stages.import_pruned import run_import_pruned

    recipe = resolve_recipe(model_name, recipe_path)
    out_dir = Path(out) if out else Path("runs") / f"{model_name or Path(recipe_path).stem}-pruned-import"
    result = run_import_pruned(recipe, Path(model_file), out_dir, weights, _log, not no_progress)
    plan = result.plan
    click.echo(f"{out_dir}: imported a {result.source.tool} model, widths "
               f"{', '.join(f'{g.name}={g.kept_units}/{g.dense_units}' for g in plan.groups)}, MACs ratio "
               f"{plan.ratio:.3f}; next: sls-deploy finetune {out_dir}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--steps", type=STEPS, help="Training steps counted as build's --steps: the search's "
              "steps (ssl's scale learning, the SLS search) plus finetuning, which runs the rest (default: the "
              "bundle's). 0: no finetuning (the searched weights as they are).")
@click.option("--data", help="Folder of HR training images (default: the recipe's train list).")
@click.option("--resume", "resume", flag_value=True, default=None, help="Continue an interrupted finetune.")
@click.option("--restart", "resume", flag_value=False, help="Discard an interrupted finetune's checkpoint.")
@_distill_options
@_compute_options
@_progress_option
def finetune(bundle_dir, steps, data, resume, distill_weight, feature_distill_weight, device, amp, channels_last,
             no_progress):
    """Masked finetuning of a bundle's plan (pruned weights stay exactly zero) -> model.safetensors."""
    from sls_deploy.core import distributed as dist
    from sls_deploy.stages.build import reopen
    from sls_deploy.stages.finetune import finetune_checkpoint, run_finetune

    run = reopen(Path(bundle_dir), _log, not no_progress, steps=steps, data=data, distill_weight=distill_weight,
                 feature_distill_weight=feature_distill_weight, compute={"device": device, "amp": amp, "channels_last": channels_last})
    ckpt = finetune_checkpoint(run)
    if resume is False and ckpt.exists():  # --restart
        ckpt.unlink()
    # no flag: continue a matching checkpoint (as build does) and refuse to touch any other
    info = run_finetune(run, resume=resume, discard=False)
    if not dist.is_main():
        return
    click.echo(f"finetuned {info.get('steps')} steps -> {run.bundle.path('model.safetensors')}")
    stale = [k for k, v in run.bundle.manifest().get("invalidated", {}).items() if v == "finetune"]
    if stale:
        click.echo(f"{' and '.join(stale)} no longer current (new weights): next `sls-deploy export {bundle_dir}` "
                   f"and `sls-deploy validate {bundle_dir}`, or the build again")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@_precision_options
@click.option("--io", type=click.Choice(IO_DTYPES), help="Input/output dtype of the FP16 graph "
              "(default: the recipe's, fp32).")
def export(bundle_dir, precisions, calib, calib_method, io):
    """Export ONNX graphs (opset >= 17, dynamic N/H/W): FP32, FP16 with FP32 islands, INT8 with Q/DQ.

    Every graph passes onnx.checker, keeps every planned N:M / 2:4 pattern (checked through Cast and
    DequantizeLinear) and runs in ONNX Runtime; nothing takes a final name unless all of that holds.
    """
    from sls_deploy.stages.build import reopen
    from sls_deploy.stages.export import run_export

    run = reopen(Path(bundle_dir), _log, precisions=tuple(precisions) or None, calib=calib,
                 calib_method=calib_method, io=io)
    info = run_export(run)
    for name, g in info["graphs"].items():
        what = (f"{g['layers_nm']} layers keep their N:M pattern, {g['layers_2to4']} are 2:4" if "layers_nm" in g
                else f"{info.get('narrower_convs', 0)} narrower convs, the dense graph's op types")
        click.echo(f"{run.bundle.path(g['file'])}: {name.upper()} {info.get('graph', 'image')} graph, {what}")


@cli.command()
@click.argument("bundle_path", type=click.Path())
@click.option("--eval-data", help="Eval images: a folder of HR images (default: the recipe's eval list, or the "
              "val/ images of a packed bundle).")
@click.option("--backend", type=click.Choice([TORCH, ORT, TRT]), default="ort", show_default=True,
              help="ort: every ONNX graph (FP32/FP16/INT8) in ONNX Runtime vs the PyTorch reference; torch: the "
                   "PyTorch model alone (quality and latency); trt: the bundle's TensorRT engine vs the FP32 graph. "
                   "ort and torch write report.json/md/html.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="With --backend trt: which graph the engine was built from.")
@click.option("--latency-runs", type=click.IntRange(1, MAX_LATENCY_RUNS), help="Timed runs per model and size "
              "(default: the recipe's validate.latency_runs).")
@click.option("--threads", type=click.IntRange(1, 1024), help="ONNX Runtime intra-op threads for latency "
              "(default: every core).")
@click.option("--no-latency", is_flag=True, help="Skip the dense-vs-pruned latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the summary.")
@_device_option
@_progress_option
def validate(bundle_path, eval_data, backend, precision, latency_runs, threads, no_latency, as_json, device,
             no_progress):
    """Does a bundle ship? Accuracy at the engine profile's min/opt/max and an odd size against the PyTorch
    reference and the ground truth (thresholds per precision from the recipe), dense-vs-pruned latency side by
    side, and report.md / report.html with plots. Exits 1 naming the first failed check.

    A packed bundle (.tar.gz, .tgz or .tar from `pack`, unpacked beside it, or its unpacked folder) carries no
    PyTorch weights: with --backend ort every packed graph runs against the packed FP32 graph at the same shapes,
    on its val/ images (no latency, no report files; the result is printed as JSON)."""
    from sls_deploy.report.document import summary_text
    from sls_deploy.stages.build import reopen
    from sls_deploy.stages.validate import ValidateOptions, check_report, run_validate

    from sls_deploy.core.bundle import GRAPH_FILES
    from sls_deploy.core.packing import is_packed

    path = Path(bundle_path)
    if backend == "trt" or is_packed(path):
        from sls_deploy.core.errors import UsageError
        from sls_deploy.stages.validate_engine import validate_engine, validate_packed

        if backend == "torch":
            raise UsageError(f"{path} is a packed bundle, which carries no PyTorch weights: validate it with "
                             "--backend ort (its graphs) or trt, or validate the bundle folder it was packed from")
        if backend == "trt":
            from sls_deploy.backends.tensorrt import require_tensorrt

            require_tensorrt()  # before anything is read or written
        from sls_deploy.core.device import inference_device

        where = inference_device(None, device) if device is not None and backend == "ort" else None  # before unpacking
        opened, recipe = _device_bundle(path)
        eval_path = Path(eval_data) if eval_data else None
        if backend == "trt":
            opened.verify(["model.onnx"])  # the reference; the engine was built here, after the manifest
            res = validate_engine(opened.root, recipe, precision, eval_path, runs=latency_runs)
        else:
            opened.verify(["model.onnx", *(n for n in GRAPH_FILES.values()
                                           if n != "model.onnx" and opened.path(n).is_file())])
            res = validate_packed(opened.root, recipe, eval_path, where or inference_device(recipe.compute))
        click.echo(json.dumps(res, indent=2))
        if not res["passed"]:
            raise ValidationError(res["verdict"])
        return
    run = reopen(Path(bundle_path), _log, not no_progress, eval_data=eval_data,
                 compute={"device": device, "amp": "off", "channels_last": "off"})  # FP32 evaluation
    vopts = ValidateOptions(backend=backend, latency=not no_latency, latency_runs=latency_runs, threads=threads)
    rep = run_validate(run, vopts)
    click.echo(json.dumps(rep, indent=2) if as_json else summary_text(rep))
    check_report(rep)


def _check_output_file(path: Path, force: bool) -> None:
    """Before any work: an output file goes where a file can go, never over an existing one without --force, and
    never over a device, fifo or socket (or a link to one) at all."""
    from sls_deploy.core.atomic import refuse_non_regular
    from sls_deploy.core.errors import BundleError

    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BundleError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    if path.is_dir():
        raise BundleError(f"{path} is a folder; give a file name")
    refuse_non_regular(path, "--out")
    if path.exists() and not force:
        raise BundleError(f"{path} exists; choose another --out or pass --force to replace it")


def _device_bundle(path: Path, use=()):
    """A bundle folder, an unpacked pack or a packed tar (unpacked beside it) opened for use, recipe.yaml and
    ``use`` checked against the recorded sha256 (core.opening); returns (the opened bundle, its recipe)."""
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.core.opening import open_for_use

    opened = open_for_use(path, use)
    return opened, load_recipe(opened.path("recipe.yaml"))


@cli.command()
@click.argument("bundle_path", type=click.Path())
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="Which graph to build: model.onnx, model.fp16.onnx or model.int8.onnx.")
@click.option("--sparsity", type=click.Choice(["enable", "disable"]), default="enable", show_default=True,
              help="TensorRT's SPARSE_WEIGHTS flag (2:4 layers may then use sparse tactics). disable builds the "
                   "dense baseline engine/model.dense.plan that `validate --backend trt` times the sparse one "
                   "against.")
@click.option("--workspace-mb", type=click.IntRange(1, MAX_WORKSPACE_MB),
              help="Workspace limit (default: the recipe's).")
@click.option("--dry-run", is_flag=True, help="Print the settings and the equivalent trtexec / polygraphy "
              "command lines and write engine/build.json; needs no TensorRT.")
def engine(bundle_path, precision, sparsity, workspace_mb, dry_run):
    """Build a TensorRT engine from a bundle (folder or packed .tar.gz) on this machine, with Polygraphy.

    Writes engine/model.plan, the build log, the inspector JSON, the timing cache and engine/layers.json
    (per plan layer: 2:4 weights, TensorRT-eligible, sparse tactic picked). Refuses a bundle whose files do not
    match their recorded sha256. On a family folder (`build --budget A --budget B`), one engine per member and,
    once `route` has run, one FP32 engine per router graph (routers/<name>/engine/model.plan; FP32 so that the
    engine's choices are the graph's: a router's argmax can flip in FP16), its profile the number of patches the
    grid gives on the recipe's engine min/opt/max LR size.
    """
    from sls_deploy.adaptive.family import is_family, load_family
    from sls_deploy.core.bundle import GRAPH_FILES
    from sls_deploy.backends.tensorrt import require_tensorrt

    if not dry_run:
        require_tensorrt()  # one line, nothing written
    path = Path(bundle_path)
    if path.is_dir() and is_family(path):
        from sls_deploy.adaptive.run import RESULT_JSON, router_profiles

        family = load_family(path)
        roots = [family.path(m) for m in family.members]
        recipes = [_device_bundle(root, [GRAPH_FILES[precision], *([] if dry_run else ["plan.json"])])[1]
                   for root in roots]  # every member checked before any engine is built
        routed = (path / RESULT_JSON).is_file()  # and every router graph (the routers' profiles follow the recipe's)
        routers = router_profiles(family, recipes[0].engine) if routed else {}
        for root in roots:
            click.echo(f"# family member {root.name}")
            _engine_one(root, precision, sparsity, workspace_mb, dry_run)
        if not routed:
            click.echo(f"# no router engines: {path} has not been routed yet (`sls-deploy route {path}`)")
        _router_engines(path, routers, workspace_mb or recipes[0].engine.workspace_mb, dry_run)
        return
    _engine_one(path, precision, sparsity, workspace_mb, dry_run)


def _router_engines(family_root: Path, routers: dict, workspace_mb: int, dry_run) -> None:
    """One FP32 engine per router graph of a routed family (``routers``: their checked profiles)."""
    from sls_deploy.adaptive.run import router_file
    from sls_deploy.trt.engine import build_engine, dry_run as do_dry_run, graph_settings

    for name, profile in routers.items():
        root = family_root / "routers" / name
        settings = graph_settings(f"../../{router_file(name)}", profile, workspace_mb)
        click.echo(f"# router {name}")
        if dry_run:
            root.mkdir(parents=True, exist_ok=True)
            info = do_dry_run(root, settings)
            click.echo(info["trtexec"])
            click.echo(f"# settings written to {root / 'engine' / 'build.json'}")
            continue
        info = build_engine(root, settings, [])
        click.echo(f"engine {root / settings.engine_file} built in {info['seconds']}s")


def _engine_one(path: Path, precision, sparsity, workspace_mb, dry_run) -> None:
    from sls_deploy.trt.engine import build_engine, dry_run as do_dry_run, engine_settings
    from sls_deploy.core.errors import BundleError

    opened, recipe = _device_bundle(path)
    root = opened.root
    settings = engine_settings(recipe, precision, sparsity, workspace_mb)
    if not (root / settings.graph).is_file():
        raise BundleError(f"{root} has no {settings.graph} (run `sls-deploy export {root} --precision {precision}`)")
    opened.verify([settings.graph, *([] if dry_run else ["plan.json"])])  # what the build reads
    if dry_run:
        info = do_dry_run(root, settings)
        click.echo(f"# {info['path']}")
        click.echo(info["trtexec"])
        click.echo(info["polygraphy"])
        click.echo(f"# settings written to {root / 'engine' / settings.out_name('build.json')}")
        return
    from sls_deploy.pruning.registry import load_plan

    plan = load_plan(root / "plan.json")
    info = build_engine(root, settings, plan.to_json()["layers"])
    click.echo(f"engine {root / settings.engine_file} built in {info['seconds']}s ({info['path']}); "
               f"per-layer sparsity in {root / 'engine' / 'layers.json'}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Tar file (default <bundle>.tar.gz). An existing file "
              "is replaced only if it is a packed bundle, or with --force.")
@click.option("--force", is_flag=True, help="Replace an existing --out file that is not a packed bundle.")
def pack(bundle_dir, out, force):
    """Pack what a device needs (graphs, plan, recipe, manifest, calibration cache, eval images) into a tar.

    Every bundle file is checked against the sha256 its manifest recorded, and every graph with onnx.checker,
    before it is packed. --out is never a file inside the bundle."""
    from sls_deploy.core.atomic import remove_stale_temps
    from sls_deploy.core.opening import open_for_use
    from sls_deploy.core.packing import check_pack_out, pack as do_pack, packed_names
    from sls_deploy.modalities.registry import lookup
    from sls_deploy.stages.build import reopen

    root = Path(bundle_dir)
    dest = Path(out) if out else root.with_name(root.name + ".tar.gz")
    check_pack_out(root, dest, force)  # before anything is read: a fifo would block the packed-bundle check
    run = reopen(root, _log)
    bundle, recipe = run.bundle, run.recipe
    remove_stale_temps(dest.parent, names={dest.name})
    # video eval clips are not packed (they can be large): a device validates video against its own clips
    evals = lookup(run.settings.modality).packed_eval_data(run.settings.eval_data)
    # every file packed matches the manifest and every graph passes onnx.checker (the manifest itself is packed as is)
    open_for_use(bundle.root, [n for n in packed_names(bundle.root) if n != "manifest.json"])
    do_pack(bundle.root, dest, evals, recipe.opset, recipe.digest(), force=force)
    click.echo(f"wrote {dest}")


@cli.command()
@click.argument("target", type=click.Path())
@click.option("--size", help="LR input size HxW at which to count MACs, e.g. 180x320 (default: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def inspect(target, size, as_json):
    """Per-layer op, weight shape, precision, 2:4 status (through DequantizeLinear and Cast) and MACs of any
    ONNX model, or of a bundle's model.onnx."""
    from sls_deploy.core.onnx_files import load_onnx
    from sls_deploy.onnx.inspect import inspect_model, parse_size, render, resolve_target

    hw = parse_size(size)
    rows = inspect_model(load_onnx(resolve_target(Path(target))), hw)
    click.echo(json.dumps(rows, indent=2) if as_json else render(rows, hw))


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder: <name>.png per image, "
              "<name>.mp4 per video (created if missing).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: the bundle's ONNX graph in ONNX Runtime (CPU; the CUDA provider with onnxruntime-gpu on a "
                   "CUDA --device); torch: the finetuned weights in PyTorch (FP32, on --device); trt: engine/model.plan through Polygraphy's TrtRunner (needs TensorRT).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="With --backend ort: which graph (model.onnx, model.fp16.onnx, model.int8.onnx).")
@click.option("--tile", type=click.IntRange(1, MAX_SIDE), default=256, show_default=True,
              help="LR tile side: memory stays bounded whatever the image size.")
@click.option("--overlap", type=click.IntRange(0, MAX_SIDE), default=16, show_default=True,
              help="LR pixels of context around each tile; at least the network's receptive radius makes the "
                   "tiled output equal the untiled one.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per output.")
@click.option("--force", is_flag=True, help="Replace existing files in the -o folder that upscale did not write "
              "(never an input, a file in a bundle, or anything but a regular file).")
@_device_option
@_progress_option
def upscale(bundle_dir, inputs, out, backend, precision, tile, overlap, as_json, force, device,
            no_progress):
    """Run a bundle on your own images (PNG/JPEG/TIFF/BMP/WebP; gray and RGBA become RGB; EXIF orientation
    applied) and videos (mp4, mov, mkv, avi, webm: every frame, same frame count and fps), tiled, with a progress
    bar. Every input and output path is checked before anything runs; each output appears only when complete. An
    existing file is replaced only if an earlier upscale wrote it and it is unchanged since, or with --force;
    never an input or a file inside a bundle."""
    from sls_deploy.upscale.run import upscale as run_upscale

    records = run_upscale(Path(bundle_dir), list(inputs), Path(out), backend=backend, precision=precision,
                          tile=tile, overlap=overlap, progress=not no_progress, force=force,
                          log=(lambda s: None) if as_json else _log, device=device)
    if as_json:
        click.echo(json.dumps(records, indent=2))


@cli.command()
@click.argument("family_dir", type=click.Path(file_okay=False))
@click.option("--router", "routers", multiple=True, type=click.Choice(["sls", "classsr", "edge"]),
              help="Routers to fit (repeatable; default all three): sls = the SLS paper's rule on a CNN's predicted "
                   "errors; classsr = a ClassSR-style patch classifier; edge = gradient-energy thresholds.")
@click.option("--target-cost", type=BUDGET, help="Average MACs (fraction of dense, overlap counted) the routers aim "
              "at, set on train patches only. Default: the middle member's cost.")
@click.option("--patch", type=click.IntRange(8, MAX_SIDE), default=48, show_default=True, help="LR patch side.")
@click.option("--stride", type=click.IntRange(1, MAX_SIDE), default=44, show_default=True,
              help="LR patch stride (overlaps are averaged and their cost counted).")
@click.option("--train-patches", type=click.IntRange(50, 100_000), default=1500, show_default=True,
              help="Random train crops the routers learn (80%) and calibrate (20%) on.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=800, show_default=True,
              help="Training steps of the learned routers.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--eval-data", help="Eval images (default: the recipe's eval list); never used to fit or calibrate.")
@click.option("--json", "as_json", is_flag=True, help="Print adaptive.json instead of the table.")
@_device_option
def route(family_dir, routers, target_cost, patch, stride, train_patches, steps, seed, eval_data, as_json, device):
    """Adaptive inference over a family (`build --budget A --budget B ...`): per LR patch, a router picks bicubic,
    a member or the dense model. Fits the routers on train patches, writes router-<name>.onnx next to the members,
    and scores every single candidate and router on the eval images at their average MACs (adaptive.json/.md,
    adaptive.png, adaptive_map.png)."""
    from sls_deploy.adaptive.routers import ROUTERS
    from sls_deploy.adaptive.run import route as run_route
    from sls_deploy.core.errors import UsageError

    if stride > patch:
        raise UsageError(f"--stride {stride} is larger than --patch {patch}: pixels would be skipped")
    rep = run_route(Path(family_dir), routers or ROUTERS, target=target_cost, size=patch, stride=stride,
                    train_patches=train_patches, steps=steps, seed=seed, eval_data=eval_data,
                    log=(lambda s: None) if as_json else _log, device=device)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        click.echo((Path(family_dir) / "adaptive.md").read_text())


class _Workers(click.ParamType):
    name = "auto|N"

    def convert(self, value, param, ctx):
        if str(value) == "auto":
            return "auto"
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = -1
        if not 0 <= n <= 256:
            self.fail(f"expected 'auto' or a count 0..256, not {str(value)[:20]!r}", param, ctx)
        return n


@cli.command("prepare-data")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--crop", type=click.IntRange(min=0), default=480, show_default=True,
              help="Sub-image size (pixels of the images given); 0 keeps whole images.")
@click.option("--step", type=click.IntRange(min=1), default=240, show_default=True,
              help="Distance between sub-images (less than --crop: they overlap).")
@click.option("--thresh", type=click.IntRange(min=0), default=0, show_default=True,
              help="A last sub-image flush with the bottom/right edge is added where more than this many pixels "
                   "would be left out (BasicSR's thresh_size).")
@click.option("--format", "fmt", type=click.Choice(["png", "memmap"]), default="png", show_default=True,
              help="png: a folder of 8-bit PNG sub-images; memmap: one uint8 file training memory-maps (nothing "
                   "decoded while training; the fastest on a slow disk).")
@click.option("--compress-level", type=click.IntRange(0, 9), default=3, show_default=True,
              help="PNG zlib level (0 decodes fastest, 9 is smallest).")
@click.option("--workers", type=_Workers(), default="auto", show_default=True,
              help="Processes that decode and cut (auto: one per spare core for large sets).")
@_progress_option
def prepare_data(source, out, crop, step, thresh, fmt, compress_level, workers, no_progress):
    """Cut the training images of SOURCE (a folder of images, or skimage:train) into BasicSR-style sub-images
    (480x480 every 240 pixels by default, as BasicSR prepares DIV2K) and write them into the new folder OUT,
    as PNGs or as a uint8 memory-mapped cache. Give OUT to --data (or the recipe's data.train) to train on
    them. OUT appears only when complete; a folder prepare-data did not write is never replaced."""
    from sls_deploy.data.prepare import prepare_data as run

    res = run(source, Path(out), crop=crop, step=step, thresh=thresh, fmt=fmt, compress_level=compress_level,
              workers=workers, progress=not no_progress, log=_log)
    click.echo(f"wrote {res['out']}: {res['sub_images']} {'sub-images' if crop else 'images'} of {res['images']} "
               f"source images ({res['format']}, {res['gigabytes']:.2f} GB, {res['seconds']:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode so every error is a single line.

    Under torchrun (WORLD_SIZE > 1) it joins the process group first; see sls_deploy/distributed.py.
    """
    from sls_deploy.core import distributed as dist

    ended = False  # normally: every torchrun rank then waits for the others before leaving
    try:
        dist.init_from_env()
        args = sys.argv[1:] if argv is None else list(argv)
        # parse and invoke directly (not cli.main): click's main turns Ctrl-C into a blank line and Abort
        with cli.make_context("sls-deploy", args) as ctx:
            rv = cli.invoke(ctx)
        ended = True
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        return 2
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted: run the same command again to resume from the last checkpoint", err=True)
        return 130
    except SlsError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except OSError as e:  # a full disk under a writer that core/atomic.py does not wrap: still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        click.echo(f"error: no space left on {e.filename or 'the device'} ({e.strerror}); free some space and run "
                   "the same command again", err=True)
        return 1
    except RuntimeError as e:  # out of device memory outside training (validate, upscale, route on a GPU)
        from sls_deploy.core.device import is_out_of_memory

        if not is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "out of device memory"
        click.echo(f"error: {first}; run it with --device cpu, or on smaller inputs (upscale: a smaller --tile)",
                   err=True)
        return 1
    finally:
        dist.shutdown(wait=ended)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
