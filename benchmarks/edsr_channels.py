#!/usr/bin/env python3
"""EDSR at equal MACs: aligned channel pruning (ssl, residual stream pruned) against the stream-kept-full variant,
uniform L1 channel pruning and SLS N:M.

For each budget the aligned ssl run goes first; every other configuration is then asked for the MACs ratio ssl
reached, so all rows compare at (nearly) equal MACs (the table states each one's ratio). Every configuration
trains the same ``--steps`` after the base model. Uniform L1 keeps multiples of ``--l1-round-to`` channels (the
same fraction in every group cannot land near the budget on 16-channel steps); SLS runs on ``--target none``
(N:M at N/M of the MACs, the paper's metric: on ``trt`` it cannot prune a 64-channel EDSR at all). Latency is
ONNX Runtime on CPU, dense and pruned FP32 graphs interleaved in one run (the validate stage's measurement).
Results: benchmarks/results/edsr_channels.json and .md.

    python benchmarks/edsr_channels.py [--budgets 0.25 0.4 0.6] [--steps 1500] [--out runs/edsr_channels]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.core.errors import SlsError  # noqa: E402
from sls_deploy.stages.build import build_bundle  # noqa: E402

CONFIGS = {  # name: build options
    "ssl (aligned, stream pruned)": {"method": "ssl", "keep_full": ()},
    "ssl, stream kept full": {"method": "ssl", "keep_full": ("stream",)},
    "l1 uniform": {"method": "l1", "keep_full": ()},
    "sls N:M (--target none)": {"method": "sls", "target": "none"},
}


def row(name: str, budget: float, rep: dict, seconds: float) -> dict:
    lat = rep["latency"]["sizes"][0]
    return {"config": name, "budget": budget, "macs_ratio": rep["macs"]["ratio"],
            "trt_cost_ratio": rep["macs"].get("target_ratio") if rep["macs"].get("target") == "trt" else None,
            "psnr_y": rep["psnr"]["pruned"], "psnr_dense": rep["psnr"]["dense"],
            "drop_db": rep["psnr"]["dense"] - rep["psnr"]["pruned"],
            "latency_ratio": lat["ratio_pruned_over_dense"], "widths": rep.get("widths") or None,
            "build_seconds": round(seconds, 1)}


def table(rows: list[dict], steps: int) -> str:
    lines = [f"EDSR-baseline x4, {steps} training steps after the base model for every row; eval PSNR-Y on the "
             "recipe's eval images; latency: ONNX Runtime CPU (2 threads), 180x320 LR, pruned/dense medians, "
             "interleaved.", "",
             "| budget | configuration | MACs ratio | PSNR-Y dB | drop vs dense dB | ORT latency pruned/dense | build s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget']:.4f} | {r['config']} | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {r['budget']:.4f} | {r['config']} | {r['macs_ratio']:.3f} | {r['psnr_y']:.3f} | "
                     f"{-r['drop_db']:+.3f} | {r['latency_ratio']:.3f}x | {r['build_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def nominal(budget: float) -> float:
    """The nominal budget a row belongs to (rows after the first ask for its MACs: 0.3966 -> 0.4)."""
    return round(budget * 20) / 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.4, 0.6])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--l1-round-to", type=int, default=8)
    ap.add_argument("--out", default="runs/edsr_channels")
    ap.add_argument("--merge", action="store_true", help="keep the rows already in the results file, replacing "
                    "those of the same configuration and budget (to two decimals)")
    args = ap.parse_args()
    recipe = resolve_recipe("edsr", None)
    dest = ROOT / "benchmarks" / "results" / "edsr_channels.json"
    kept = json.loads(dest.read_text())["rows"] if args.merge and dest.is_file() else []
    kept = [r for r in kept if not (r["config"] in args.configs and nominal(r["budget"]) in args.budgets)]
    rows: list[dict] = []
    for budget in args.budgets:
        first = [r for r in kept if nominal(r["budget"]) == budget and "macs_ratio" in r]
        reached = first[0]["macs_ratio"] if first else None  # merged rows: the existing first row's MACs
        for name in args.configs:
            opts = dict(CONFIGS[name])
            if opts["method"] == "l1":
                opts["round_to"] = args.l1_round_to
            b = budget if reached is None else round(reached, 4)  # the first row's MACs for every other row
            slug = name.split(" ")[0] + ("-full" if "full" in name else "")
            out = Path(args.out) / f"{slug}-b{budget:.2f}-s{args.steps}"
            t0 = time.perf_counter()
            try:
                rep = build_bundle(recipe, out, budget=b, steps=args.steps, progress=False, log=lambda s: None,
                                   **opts)
            except SlsError as e:
                print(f"{name} at {b}: {e}", flush=True)
                rows.append({"config": name, "budget": b, "error": str(e)})
                continue
            r = row(name, b, rep, time.perf_counter() - t0)
            if reached is None:
                reached = r["macs_ratio"]
            rows.append(r)
            print(f"{name:30s} budget {b:.4f}: MACs {r['macs_ratio']:.3f}, Y-PSNR {r['psnr_y']:.3f} "
                  f"({-r['drop_db']:+.3f} dB), latency {r['latency_ratio']:.3f}x, {r['build_seconds']:.0f} s",
                  flush=True)
            merged = sorted(kept + rows, key=lambda r: -nominal(r["budget"]))
            dest.write_text(json.dumps({"steps": args.steps, "rows": merged}, indent=2) + "\n")
            dest.with_suffix(".md").write_text(table(merged, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
