#!/usr/bin/env python3
"""EDSR at equal cost: channel pruning (ssl with the residual stream aligned, uniform l1) against SLS N:M.

For each budget, the channel methods run first; SLS is then asked for the MACs ratio the first of them reached
(ssl by default), so those two rows compare at (nearly) equal MACs. Every method trains the same `--steps` after the base model. Latency is
ONNX Runtime on CPU, dense and pruned FP32 graphs interleaved in one run (the validate stage's measurement).
Results: benchmarks/results/edsr_channels.json.

    python benchmarks/edsr_channels.py [--budgets 0.25 0.4 0.6] [--steps 300] [--out runs/edsr_channels]
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


def row(method: str, budget: float, rep: dict, seconds: float) -> dict:
    lat = rep["latency"]["sizes"][0]
    return {"method": method, "budget": budget, "macs_ratio": rep["macs"]["ratio"],
            "psnr_y": rep["psnr"]["pruned"], "psnr_dense": rep["psnr"]["dense"],
            "drop_db": rep["psnr"]["dense"] - rep["psnr"]["pruned"],
            "latency_ratio": lat["ratio_pruned_over_dense"], "widths": rep.get("widths") or None,
            "build_seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.4, 0.6])
    ap.add_argument("--channel-methods", nargs="+", default=["ssl", "l1"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/edsr_channels")
    args = ap.parse_args()
    recipe = resolve_recipe("edsr", None)
    rows = []
    dest = ROOT / "benchmarks" / "results" / "edsr_channels.json"
    for budget in args.budgets:
        reached = []
        for method in args.channel_methods + ["sls"]:
            b = budget if method != "sls" or not reached else round(reached[0], 4)  # SLS at the first method's MACs
            out = Path(args.out) / f"{method}-b{budget:.2f}-s{args.steps}"
            t0 = time.perf_counter()
            try:
                rep = build_bundle(recipe, out, budget=b, method=method, steps=args.steps, progress=False,
                                   log=lambda s: None)
            except SlsError as e:
                print(f"{method} at {b}: {e}", flush=True)
                rows.append({"method": method, "budget": b, "error": str(e)})
                continue
            r = row(method, b, rep, time.perf_counter() - t0)
            if method != "sls":
                reached.append(r["macs_ratio"])
            rows.append(r)
            print(f"{method:4s} budget {b:.4f}: MACs {r['macs_ratio']:.3f}, Y-PSNR {r['psnr_y']:.3f} "
                  f"({-r['drop_db']:+.3f} dB), latency {r['latency_ratio']:.3f}x, {r['build_seconds']:.0f} s",
                  flush=True)
            dest.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
