#!/usr/bin/env python3
"""The FP32 graphs of benchmarks/peers.py's rows timed in one process, interleaved, on ONNX Runtime CPU.

Each peers row's own latency ratio is measured interleaved with the dense graph inside that row's validate stage, but
rows run at different times under different machine loads, so ratios of different rows are not a comparison of
methods. Here every row's graph (one seed per budget and method) and the dense graph run side by side in the same
rounds (``backends.latency.time_side_by_side``: warm-up, then rounds in which each graph runs once, the order
alternating): the ratios below share one machine state. Run it on a quiet machine.

    nice python benchmarks/peers_latency.py [--steps 1500] [--seed 0] [--runs 15]

Results: benchmarks/results/peers_latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edsr_channels import nominal  # noqa: E402
from sls_deploy.backends.latency import ort_call, time_side_by_side  # noqa: E402
from sls_deploy.backends.loading import graph_spec  # noqa: E402
from sls_deploy.backends.sessions import timed_session  # noqa: E402
from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.core import atomic  # noqa: E402
from sls_deploy.core.bundle import ONNX  # noqa: E402
from sls_deploy.stages.export import DENSE_ONNX  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    ap.add_argument("--out", default="runs/peers", help="peers.py's --out (the rows' bundles)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    ap.add_argument("--dest", default=str(ROOT / "benchmarks" / "results" / "peers_latency.json"))
    args = ap.parse_args()
    recipe = resolve_recipe("edsr", None)
    rows = [r for r in json.loads(Path(args.results).read_text())["rows"]
            if "error" not in r and r["steps"] == args.steps and r["seed"] == args.seed]
    bundles = {}
    for r in rows:
        b = Path(args.out) / f"{r['method']}-b{r['budget']:.2f}-s{r['seed']}-n{r['steps']}"
        if (b / ONNX).is_file():
            bundles[(nominal(r["budget"]), r["method"])] = (b, r)
    if not bundles:
        print(f"no bundle with a {ONNX} for steps {args.steps} seed {args.seed} under {args.out}", file=sys.stderr)
        return 1
    dense = next((b / "work" / DENSE_ONNX for b, _ in bundles.values() if (b / "work" / DENSE_ONNX).is_file()), None)
    if dense is None:
        print(f"no work/{DENSE_ONNX} in any bundle", file=sys.stderr)
        return 1
    h, w = recipe.engine.profile_sizes()["opt"]
    x = recipe.adapter.example_input(recipe.model, h, w).numpy()
    name = graph_spec(recipe).input_names[0]
    sessions, threads = {}, None
    for key, path in [(("dense", "dense"), dense)] + [(k, b / ONNX) for k, (b, _) in sorted(bundles.items())]:
        sessions[key], threads = timed_session(path, args.threads)
    label = {k: "dense" if k[0] == "dense" else f"{k[0]}/{k[1]}" for k in sessions}
    t = time_side_by_side({label[k]: ort_call(s, {name: x}) for k, s in sessions.items()}, args.warmup, args.runs)
    dense_ms = t["dense"].median_ms
    out = {"lr_hw": [h, w], "threads": threads, "runs": args.runs, "warmup": args.warmup, "steps": args.steps,
           "seed": args.seed, "dense_median_ms": dense_ms, "rows": []}
    for k, (b, r) in sorted(bundles.items()):
        tm = t[label[k]]
        out["rows"].append({"budget": k[0], "method": k[1], "macs_ratio": r["macs_ratio"], "psnr_y": r["psnr_y"],
                            "median_ms": tm.median_ms, "p90_ms": tm.p90_ms, "ratio": tm.median_ms / dense_ms,
                            "widths": r.get("widths")})
    dest = Path(args.dest)
    atomic.write_text(dest, json.dumps(out, indent=2) + "\n")
    lines = [f"ONNX Runtime CPU, {threads} threads, LR {h}x{w} (1280x720 output), FP32 graphs of benchmarks/peers.py's "
             f"rows at {args.steps} steps, seed {args.seed}, all timed in one process, interleaved "
             f"({args.warmup} warm-up, {args.runs} rounds, medians). Dense: {dense_ms:.1f} ms.", "",
             "| budget | method | MACs ratio | PSNR-Y dB | median ms | p90 ms | pruned/dense |",
             "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['budget']} | {r['method']} | {r['macs_ratio']:.4f} | {r['psnr_y']:.3f} | "
                     f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['ratio']:.3f}x |")
    atomic.write_text(dest.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
