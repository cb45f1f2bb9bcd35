#!/usr/bin/env python3
"""Unit-importance criteria at equal MACs, before any training: L1 norm, Fisher per MAC, group Taylor per MAC.

Each criterion (``pruning.channels.importance``) ranks the units of the recipe's channel groups on the shipped
EDSR-baseline base weights (groups of ``keep_full`` stay whole, as in the recipe); one global threshold under the
same MAC budget (``select_global``, ``--round-to``) picks the kept units, the dense weights are sliced into the
narrower model, and the sliced model is scored as it is (no finetuning: this isolates what the ranking keeps) on
the recipe's eval images (PSNR-Y). Fisher and Taylor are measured on the same ``--batches`` training batches (seed
7919, as the search draws them). Small-scale: one model, zero-shot, a few batches; a build's finetuning changes
the picture (benchmarks/edsr_channels.py compares whole builds). Results: benchmarks/results/importance_criteria.md.

    python benchmarks/importance_criteria.py [--budgets 0.4 0.6] [--batches 16] [--round-to 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.data.sources import resolve_images  # noqa: E402
from sls_deploy.modalities import registry as modalities  # noqa: E402
from sls_deploy.modalities.image import evaluate, torch_infer  # noqa: E402
from sls_deploy.pruning.channels.costs import GroupCosts  # noqa: E402
from sls_deploy.pruning.channels.groups import widths_of  # noqa: E402
from sls_deploy.pruning.channels.importance import RANKINGS, L1Importance  # noqa: E402
from sls_deploy.pruning.channels.selection import select_global  # noqa: E402
from sls_deploy.pruning.channels.slicing import slice_into  # noqa: E402
from sls_deploy.backends.loading import load_model, model_config, resolve_base_weights  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edsr")
    ap.add_argument("--recipe", help="a recipe file instead of --model (with --weights: its base weights)")
    ap.add_argument("--weights")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.6])
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "importance_criteria.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    recipe = resolve_recipe(None if args.recipe else args.model, args.recipe)
    model = load_model(recipe, resolve_base_weights(recipe, args.weights))
    adapter = recipe.adapter
    groups = adapter.channel_groups(model)
    h, w = recipe.reference_input_hw()
    costs = GroupCosts.measure(adapter.export_module(model), groups, adapter.example_input(recipe.model, h, w))
    full = {g.name for g in groups if g.name in set(recipe.structured.keep_full)}
    files = resolve_images(recipe.data_eval)
    ch = recipe.metric_channel
    dense = evaluate(torch_infer(adapter.export_module(model).eval()), files, recipe.scale, ch, with_ssim=False).psnr
    criteria = {"l1": L1Importance()}
    for name, cls in RANKINGS.items():
        criteria[name] = cls(lambda: modalities.sampler(recipe, "image", recipe.data_train, 7919),
                             torch.nn.functional.l1_loss)
        criteria[name].batches = args.batches
    scores, seconds = {}, {}
    for name, crit in criteria.items():
        t0 = time.perf_counter()
        scores[name] = crit.scores(model, groups, costs, skip=full)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: ranked in {seconds[name]:.1f} s", flush=True)
    lines = [f"{recipe.name}, zero-shot (no finetuning) PSNR-{ch.upper()} of the sliced base model on "
             f"{recipe.data_eval} ({len(files)} images); groups kept full: {', '.join(sorted(full)) or 'none'}; "
             f"round-to {args.round_to}; Fisher/Taylor on {args.batches} training batches of "
             f"{recipe.finetune.batch_size} x {recipe.finetune.lr_patch}px LR patches. Dense: {dense:.3f} dB.", "",
             "| budget | criterion | MACs ratio | PSNR dB | drop vs dense dB | ranking s |", "|---|---|---|---|---|---|"]
    for budget in args.budgets:
        for name, crit in criteria.items():
            keep = select_global(scores[name], costs, budget, args.round_to, normalize=crit.normalize)
            keep.update({g: torch.arange(costs.units[g]) for g in full})
            widths = widths_of(keep)
            sliced = adapter.build(model_config(recipe, widths))
            slice_into(model, sliced, groups, keep)
            q = evaluate(torch_infer(adapter.export_module(sliced).eval()), files, recipe.scale, ch,
                         with_ssim=False).psnr
            ratio = costs.ratio(widths)
            lines.append(f"| {budget:g} | {name} | {ratio:.4f} | {q:.3f} | {q - dense:+.3f} | {seconds[name]:.1f} |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
