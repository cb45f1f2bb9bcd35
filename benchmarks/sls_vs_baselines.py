#!/usr/bin/env python3
"""Benchmark: SLS vs one-shot uniform N:M vs SR-STE uniform N:M on EDSR-baseline x4 (shipped weights).

Every method gets the same number of training steps after the base model (`--steps`, search + finetune), the
same data (skimage:train) and seed; quality is Y-PSNR on skimage:eval. Writes
benchmarks/results/sls_vs_baselines.{json,md} and a bar chart of the per-layer N that SLS chose.

    python benchmarks/sls_vs_baselines.py --m 32 --budgets 0.5 0.4 0.25 --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.core.errors import SlsError  # noqa: E402
from sls_deploy.stages.build import build_bundle  # noqa: E402
from sls_deploy.config.recipe import resolve_recipe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.4, 0.25])
    ap.add_argument("--methods", nargs="+", default=["sls", "oneshot", "srste"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--equal-cost", action="store_true",
                    help="per budget and seed: one-shot first, then SLS asked for exactly the MACs ratio one-shot "
                         "reached (the paper's comparison); writes sls_vs_baselines_m<M>_equal.{json,md}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    if args.equal_cost:
        return equal_cost(args)

    recipe = resolve_recipe("edsr", None)
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            out = Path(args.out) / f"{method}-m{args.m}-b{budget:.2f}-s{args.steps}"
            t0 = time.perf_counter()
            try:
                rep = build_bundle(recipe, out, budget=budget, method=method, m=args.m, steps=args.steps,
                                   progress=False, log=lambda s: None)
            except SlsError as e:
                print(f"{method} b={budget}: {e}", flush=True)
                rows.append({"method": method, "budget": budget, "error": str(e)})
                continue
            plan = json.loads((out / "plan.json").read_text())
            row = {"method": method, "budget": budget, "m": args.m, "steps": args.steps,
                   "macs_ratio": rep["macs"]["ratio"], "trt_2to4_ratio": plan["macs"]["trt_2to4_ratio"],
                   "psnr_y": rep["psnr"]["pruned"], "psnr_y_dense": rep["psnr"]["dense"],
                   "psnr_y_bicubic": rep["psnr"]["bicubic"], "seconds": round(time.perf_counter() - t0, 1),
                   "layer_n": {l["name"]: l["n"] for l in plan["layers"]},
                   "search": {k: plan["search"].get(k) for k in ("steps", "reached_budget_at",
                                                                  "gates_closed_by_force")}}
            rows.append(row)
            print(f"{method:8s} b={budget:.2f}: ratio {row['macs_ratio']:.3f}  PSNR-Y {row['psnr_y']:.3f} dB "
                  f"({row['seconds']:.0f}s)", flush=True)
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sls_vs_baselines_m{args.m}{args.tag}"
    (res_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    ok = [r for r in rows if "error" not in r]
    lines = [f"EDSR-baseline x4, M={args.m}, {args.steps} steps after the base model, eval Y-PSNR on skimage:eval "
             f"(dense {ok[0]['psnr_y_dense']:.3f} dB, bicubic {ok[0]['psnr_y_bicubic']:.3f} dB)" if ok else "", "",
             "| budget | method | MACs ratio | 2:4-accelerated bound | Y-PSNR (dB) | vs one-shot |", "|---|---|---|---|---|---|"]
    base = {r["budget"]: r["psnr_y"] for r in ok if r["method"] == "oneshot"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['method']} | - | - | {r['error']} | - |")
            continue
        delta = f"{r['psnr_y'] - base[r['budget']]:+.3f}" if r["budget"] in base else "-"
        lines.append(f"| {r['budget']} | {r['method']} | {r['macs_ratio']:.3f} | {r['trt_2to4_ratio']:.3f} | "
                     f"{r['psnr_y']:.3f} | {delta} |")
    (res_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    sls = [r for r in ok if r["method"] == "sls"]
    if sls:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(sls[0]["layer_n"])
        fig, ax = plt.subplots(figsize=(12, 3.5))
        width = 0.8 / len(sls)
        for i, r in enumerate(sls):
            ax.bar([x + i * width for x in range(len(names))], [r["layer_n"][n] for n in names], width,
                   label=f"budget {r['budget']}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=90, fontsize=7)
        ax.set_ylabel(f"N (of M={args.m})")
        ax.set_title("Per-layer N chosen by SLS (EDSR-baseline x4)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(res_dir / f"{stem}_layer_n.png", dpi=110)
    print("\n".join(lines))
    return 0


def _build(recipe, out: Path, budget: float, method: str, m: int, steps: int, seed: int) -> dict:
    t0 = time.perf_counter()
    rep = build_bundle(recipe, out, budget=budget, method=method, m=m, steps=steps, seed=seed, target="none",
                       progress=False, log=lambda s: None)
    return {"method": method, "asked": budget, "seed": seed, "macs_ratio": rep["macs"]["ratio"],
            "psnr_y": rep["psnr"]["pruned"], "psnr_y_dense": rep["psnr"]["dense"],
            "seconds": round(time.perf_counter() - t0, 1)}


def equal_cost(args) -> int:
    """One-shot, then SLS at one-shot's MACs ratio, for every budget and seed; the table gives per-method means,
    the paired SLS - one-shot difference (mean and range over seeds) and each one's MACs ratio."""
    recipe = resolve_recipe("edsr", None)
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = res_dir / f"sls_vs_baselines_m{args.m}_equal{args.tag}"
    rows: list[dict] = []
    for budget in args.budgets:
        for seed in args.seeds:
            tag = f"m{args.m}-b{budget:.3f}-s{args.steps}-seed{seed}"
            one = _build(recipe, Path(args.out) / f"oneshot-{tag}", budget, "oneshot", args.m, args.steps, seed)
            asked = math.ceil(one["macs_ratio"] * 1e4) / 1e4  # rounded up: one-shot's ratio itself is reachable
            try:
                sls = _build(recipe, Path(args.out) / f"sls-eq-{tag}", asked, "sls", args.m, args.steps, seed)
            except SlsError as e:
                print(f"sls at {asked}: {e}", flush=True)
                sls = {"method": "sls", "asked": asked, "seed": seed, "error": str(e)}
            for r in (one, sls):
                if "error" in r:
                    rows.append({**r, "budget": budget, "m": args.m, "steps": args.steps})
                    continue
                rows.append({**r, "budget": budget, "m": args.m, "steps": args.steps})
                print(f"{r['method']:8s} b={budget} seed {seed}: ratio {r['macs_ratio']:.4f} PSNR-Y "
                      f"{r['psnr_y']:.3f} ({r['seconds']:.0f}s)", flush=True)
            stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
            stem.with_suffix(".md").write_text(equal_table(rows, args))
    print(equal_table(rows, args))
    return 0


def equal_table(rows: list[dict], args) -> str:
    lines = [f"EDSR-baseline x4, M={args.m}, {args.steps} steps after the base model for every run, --target none "
             "(MACs with N:M at N/M); per budget and seed one-shot runs first and SLS is asked for exactly the MACs "
             "ratio it reached. Eval Y-PSNR on skimage:eval.", "",
             "| budget | seeds | one-shot MACs | SLS MACs | one-shot PSNR-Y | SLS PSNR-Y | SLS - one-shot dB "
             "(mean, range over seeds) |", "|---|---|---|---|---|---|---|"]
    for budget in dict.fromkeys(r["budget"] for r in rows):
        one = {r["seed"]: r for r in rows if r["budget"] == budget and r["method"] == "oneshot"}
        sls = {r["seed"]: r for r in rows if r["budget"] == budget and r["method"] == "sls" and "error" not in r}
        seeds = sorted(set(one) & set(sls))
        if not seeds:
            continue
        d = [sls[s]["psnr_y"] - one[s]["psnr_y"] for s in seeds]

        def mean(xs):
            return sum(xs) / len(xs)

        lines.append(f"| {budget} | {len(seeds)} | {mean([one[s]['macs_ratio'] for s in seeds]):.4f} | "
                     f"{mean([sls[s]['macs_ratio'] for s in seeds]):.4f} | "
                     f"{mean([one[s]['psnr_y'] for s in seeds]):.3f} | {mean([sls[s]['psnr_y'] for s in seeds]):.3f} | "
                     f"{mean(d):+.3f} ({min(d):+.3f}..{max(d):+.3f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
