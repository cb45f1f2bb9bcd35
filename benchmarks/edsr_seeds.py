#!/usr/bin/env python3
"""EDSR at budget 0.4 over several seeds: the pairs that decide issue 12's goal (aligned, stream pruned, against
uniform L1 at the same MACs) and the length of ssl's regularisation phase (``structured.ssl_steps``).

Every configuration trains the same ``--steps`` after the base model (ssl: ``ssl_steps`` of them under the growing
penalty at full width, the rest finetuning the sliced model; L1: all finetuning). Uniform L1 is asked for 0.398
(what the aligned rows reach at 0.4, ``benchmarks/edsr_channels.py``) at ``--round-to 4``. For each seed, each
row's PSNR is compared with the uniform L1 row of the same seed; the summary gives the mean and range over seeds.
Bundles already built in ``--out`` with the same settings are reused (the build resumes, nothing retrains).
Results: benchmarks/results/edsr_seeds.json and .md.

    python benchmarks/edsr_seeds.py [--seeds 0 1 2] [--configs ...] [--out runs/edsr_seeds]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edsr_channels import recipe_with, row, slugify, stage_seconds  # noqa: E402  (a sibling benchmark)

from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.stages.build import build_bundle  # noqa: E402

BASELINE = "l1 uniform"
CONFIGS = {  # name: (budget, build options; "recipe": values merged into the recipe)
    BASELINE: (0.398, {"method": "l1", "keep_full": (), "round_to": 4}),
    "ssl aligned, Fisher widths, 100 reg steps": (0.4, {"method": "ssl", "keep_full": (), "selection": "fisher",
                                                        "recipe": {"structured": {"ssl_steps": 100}}}),
    "ssl aligned, Fisher widths, 500 reg steps": (0.4, {"method": "ssl", "keep_full": (), "selection": "fisher",
                                                        "recipe": {"structured": {"ssl_steps": 500}}}),
    "ssl, stream kept full, 100 reg steps": (0.4, {"method": "ssl", "keep_full": ("stream",),
                                                   "recipe": {"structured": {"ssl_steps": 100}}}),
    "ssl, stream kept full, 500 reg steps": (0.4, {"method": "ssl", "keep_full": ("stream",),
                                                   "recipe": {"structured": {"ssl_steps": 500}}}),
}


def summary(rows: list[dict]) -> list[dict]:
    """Per configuration: mean PSNR over seeds and its gain over the same seed's baseline (mean, min, max)."""
    base = {r["seed"]: r["psnr_y"] for r in rows if r["config"] == BASELINE}
    out = []
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        gains = [r["psnr_y"] - base[r["seed"]] for r in mine if r["seed"] in base]
        out.append({"config": name, "seeds": sorted(r["seed"] for r in mine),
                    "macs_ratio": statistics.mean(r["macs_ratio"] for r in mine),
                    "psnr_y_mean": statistics.mean(r["psnr_y"] for r in mine),
                    "gain_vs_l1_mean": statistics.mean(gains) if gains else None,
                    "gain_vs_l1_min": min(gains) if gains else None,
                    "gain_vs_l1_max": max(gains) if gains else None})
    return out


def table(rows: list[dict], steps: int) -> str:
    lines = [f"EDSR-baseline x4 at budget 0.4, {steps} training steps after the base model for every row; eval "
             "PSNR-Y on the recipe's eval images; gain: PSNR minus uniform L1's at the same seed.", "",
             "| configuration | seeds | MACs ratio | PSNR-Y dB per seed | mean | gain vs L1, mean (min..max) |",
             "|---|---|---|---|---|---|"]
    for s in summary(rows):
        per = " / ".join(f"{r['psnr_y']:.3f}" for r in sorted((r for r in rows if r["config"] == s["config"]),
                                                                key=lambda r: r["seed"]))
        gain = "-" if s["config"] == BASELINE or s["gain_vs_l1_mean"] is None else \
            f"{s['gain_vs_l1_mean']:+.3f} ({s['gain_vs_l1_min']:+.3f}..{s['gain_vs_l1_max']:+.3f})"
        lines.append(f"| {s['config']} | {', '.join(map(str, s['seeds']))} | {s['macs_ratio']:.3f} | {per} | "
                     f"{s['psnr_y_mean']:.3f} | {gain} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/edsr_seeds")
    args = ap.parse_args()
    recipe = resolve_recipe("edsr", None)
    dest = ROOT / "benchmarks" / "results" / "edsr_seeds.json"
    rows: list[dict] = []
    for seed in args.seeds:
        for name in args.configs:
            budget, opts = CONFIGS[name]
            opts = dict(opts)
            rec = recipe_with(recipe, opts.pop("recipe", None), Path(args.out) / "recipes" / f"{slugify(name)}.yaml")
            out = Path(args.out) / f"{slugify(name)}-s{seed}"
            t0 = time.perf_counter()
            rep = build_bundle(rec, out, budget=budget, steps=args.steps, seed=seed, progress=False,
                               log=lambda s: None, **opts)
            r = {**row(name, budget, rep, stage_seconds(out, time.perf_counter() - t0)), "seed": seed}
            print(f"seed {seed} {name:45s} MACs {r['macs_ratio']:.3f}, Y-PSNR {r['psnr_y']:.3f}, "
                  f"latency {r['latency_ratio']:.3f}x, {r['build_seconds']:.0f} s", flush=True)
            rows.append(r)
            dest.write_text(json.dumps({"steps": args.steps, "baseline": BASELINE, "rows": rows,
                                        "summary": summary(rows)}, indent=2) + "\n")
            dest.with_suffix(".md").write_text(table(rows, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
