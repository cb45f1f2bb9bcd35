#!/usr/bin/env python3
"""SSL for video as published, at equal MACs: ssl without RSC (blocks read and write the whole stream), ssl with
Residual Sparsity Connections, ssl + RSC + temporal finetuning (hidden states distilled from the dense model),
uniform L1 channel pruning (no RSC), and ssl + RSC with SSL's own selection (one threshold on the raw |scale| of
every unit, ``--selection raw``) instead of the per-group normalised one.

The first configuration runs at ``--budget``; every other one is asked for the MACs ratio it reached, so all rows
compare at (nearly) equal MACs. Every configuration trains the recipe's ``finetune.steps`` (ssl: its learned-scale
steps included), with the recipe's frame-difference weight. Columns: MACs ratio, eval PSNR-Y (first
``clip_len`` frames of every eval clip), ONNX Runtime CPU latency per frame (dense and pruned FP32 graphs
interleaved), and the drift over the whole first eval clip (gap dense - pruned per frame, least-squares slope).
Results: benchmarks/results/video_ssl.json and .md.

    python benchmarks/video_ssl.py [--model basicvsr] [--budget 0.5] [--tf-weight 0.1] [--out runs/video_ssl]
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

NO_RSC = ("*.read", "*.write")


def configs(tf: float) -> dict[str, dict]:
    return {"ssl, no RSC (before)": {"method": "ssl", "keep_full": NO_RSC},
            "ssl + RSC": {"method": "ssl"},
            f"ssl + RSC + TF ({tf:g})": {"method": "ssl", "tf_weight": tf},
            "uniform L1, no RSC": {"method": "l1", "keep_full": NO_RSC},
            "ssl + RSC, raw |scale| selection (SSL's)": {"method": "ssl", "selection": "raw"}}


def row(name: str, budget: float, rep: dict, seconds: float) -> dict:
    lat = (rep["latency"].get("sizes") or [{}])[0]
    d = rep["drift"]
    return {"config": name, "budget": budget, "macs_ratio": rep["macs"]["ratio"],
            "psnr_y": rep["psnr"]["pruned"], "psnr_dense": rep["psnr"]["dense"],
            "drop_db": rep["psnr"]["dense"] - rep["psnr"]["pruned"],
            "latency_ratio": lat.get("ratio_pruned_over_dense"),
            "ms_per_frame": {"dense": lat.get("dense", {}).get("median_ms_per_frame"),
                             "pruned": lat.get("pruned", {}).get("median_ms_per_frame")},
            "drift": {k: d[k] for k in ("clip", "frames", "gap_first_half", "gap_second_half",
                                        "slope_db_per_100_frames")},
            "widths": rep.get("widths"), "finetune": rep.get("finetune", {}).get("tf"),
            "build_seconds": round(seconds, 1)}


def table(rows: list[dict], recipe) -> str:
    lines = [f"{recipe.name}, the same {recipe.finetune.steps} training steps for every row; eval PSNR-Y on the first "
             f"{recipe.model.options['clip_len']} frames of every eval clip; latency: ONNX Runtime CPU per frame, "
             "dense and pruned interleaved; drift: whole first eval clip, gap = dense - pruned.", "",
             "| configuration | MACs ratio | PSNR-Y dB | drop vs dense dB | ORT latency pruned/dense | gap 1st half -> "
             "2nd half dB | drift slope dB/100 frames | build s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | - | - | - | - | - | - | {r['error']} |")
            continue
        d = r["drift"]
        lines.append(f"| {r['config']} | {r['macs_ratio']:.3f} | {r['psnr_y']:.3f} | {-r['drop_db']:+.3f} | "
                     f"{r['latency_ratio']:.3f}x | {d['gap_first_half']:+.3f} -> {d['gap_second_half']:+.3f} | "
                     f"{d['slope_db_per_100_frames']:+.3f} | {r['build_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="basicvsr")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tf-weight", type=float, default=0.1)
    ap.add_argument("--only", nargs="+", help="a subset of the configurations (by their index 0..4)")
    ap.add_argument("--out", default="runs/video_ssl")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    recipe = resolve_recipe(args.model, None)
    rows, reached = [], None
    dest = ROOT / "benchmarks" / "results" / f"video_ssl{args.tag}.json"
    for i, (name, opts) in enumerate(configs(args.tf_weight).items()):
        if args.only and str(i) not in args.only:
            continue
        b = args.budget if reached is None else round(reached, 4)
        out = Path(args.out) / f"{recipe.name}-c{i}-b{args.budget:.2f}"
        t0 = time.perf_counter()
        try:
            rep = build_bundle(recipe, out, budget=b, progress=False, log=lambda s: None, **opts)
        except SlsError as e:
            print(f"{name} at {b}: {e}", flush=True)
            rows.append({"config": name, "budget": b, "error": str(e)})
            continue
        r = row(name, b, rep, time.perf_counter() - t0)
        reached = r["macs_ratio"] if reached is None else reached
        rows.append(r)
        print(f"{name:28s} budget {b:.4f}: MACs {r['macs_ratio']:.3f}, PSNR-Y {r['psnr_y']:.3f} ({-r['drop_db']:+.3f}),"
              f" latency {r['latency_ratio']:.3f}x, drift slope {r['drift']['slope_db_per_100_frames']:+.3f}, "
              f"{r['build_seconds']:.0f} s", flush=True)
        dest.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        dest.with_suffix(".md").write_text(table(rows, recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
