#!/usr/bin/env python3
"""Benchmark: channel pruning of the small video models, ssl (learned scales) vs l1 (uniform L1-norm), with and
without the temporal term of the finetuning loss.

Every configuration starts from the same base weights, gets the same finetune steps (`--steps`; ssl also spends
`structured.ssl_steps` on its learned-scale search, reported as `search_steps`), data and seed, and is scored on
the same eval clips. Per configuration: MACs ratio, eval Y-PSNR (dense, pruned, drop), SSIM, per-frame PSNR, and
ONNX Runtime CPU latency per frame of the dense and the pruned FP32 graphs measured side by side in one run
(median, ratio). Writes benchmarks/results/video_pruning.{json,md} (`--results`, `--tag`).

    python benchmarks/video_pruning.py --model basicvsr --budget 0.5
    python benchmarks/video_pruning.py --recipe tiny.yaml --weights w.safetensors --steps 2 --ssl-steps 2 \\
        --results /tmp/bench   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.core.errors import SlsError  # noqa: E402
from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.stages.build import build_bundle  # noqa: E402


def row_of(rep: dict, method: str, tw: float, seconds: float) -> dict:
    p, lat = rep["psnr"], (rep["latency"].get("sizes") or [{}])[0]
    search = rep.get("search", {})
    return {
        "method": method, "temporal_weight": tw, "budget": rep["budget"], "macs_ratio": rep["macs"]["ratio"],
        "gmacs_per_frame": {"dense": rep["macs"]["dense"], "pruned": rep["macs"]["pruned"]},
        "psnr_y": {"bicubic": p["bicubic"], "dense": p["dense"], "pruned": p["pruned"],
                   "drop": p["dense"] - p["pruned"]},
        "ssim": {"dense": rep["ssim"]["dense"], "pruned": rep["ssim"]["pruned"]},
        "per_frame_psnr_pruned": p["per_frame_mean"]["pruned"], "per_frame_psnr_dense": p["per_frame_mean"]["dense"],
        "latency_ms_per_frame": {"dense": lat.get("dense", {}).get("median_ms_per_frame"),
                                 "pruned": lat.get("pruned", {}).get("median_ms_per_frame"),
                                 "ratio": lat.get("ratio_pruned_over_dense"), "lr_hw": lat.get("lr_hw"),
                                 "threads": rep["latency"].get("threads"), "runs": rep["latency"].get("runs")},
        "onnx_max_abs": rep["onnx_vs_torch"]["max_abs"],
        "finetune_steps": rep.get("finetune", {}).get("steps"), "search_steps": search.get("ssl_steps", 0),
        "widths": rep["widths"], "seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], args, recipe) -> str:
    ok = [r for r in rows if "error" not in r]
    head = (f"{recipe.name} ({recipe.model.arch}), budget {args.budget}, the same training "
            f"steps for every configuration (ssl: learned-scale search + finetune), eval Y-PSNR on "
            f"{args.eval_data or recipe.data_eval}, first {recipe.model.options['clip_len']} frames per clip.")
    lines = [head, ""]
    if ok:
        r0 = ok[0]
        lines += [f"Dense {r0['psnr_y']['dense']:.3f} dB, bicubic {r0['psnr_y']['bicubic']:.3f} dB. Latency: ONNX "
                  f"Runtime CPU FP32, {r0['latency_ms_per_frame']['threads']} threads, LR "
                  f"{r0['latency_ms_per_frame']['lr_hw']}, dense and pruned graphs interleaved in the same run.", ""]
    lines += ["| method | temporal weight | MACs ratio | PSNR-Y pruned | drop vs dense | SSIM pruned | "
              "ms/frame dense | ms/frame pruned | latency ratio | steps (search + finetune) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['temporal_weight']} | - | {r['error']} | - | - | - | - | - | - |")
            continue
        lat = r["latency_ms_per_frame"]
        fmt = lambda v, nd=1: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['temporal_weight']:g} | {r['macs_ratio']:.3f} | {r['psnr_y']['pruned']:.3f} "
                     f"| {r['psnr_y']['drop']:+.3f} | {r['ssim']['pruned']:.4f} | {fmt(lat['dense'])} | "
                     f"{fmt(lat['pruned'])} | {fmt(lat['ratio'], 3)} | {r['search_steps']} + {r['finetune_steps']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="basicvsr", help="built-in recipe (basicvsr or streamvsr)")
    ap.add_argument("--recipe", help="a recipe file instead of --model")
    ap.add_argument("--weights", help="base weights (default: the recipe's shipped weights)")
    ap.add_argument("--data", help="training clips (default: the recipe's)")
    ap.add_argument("--eval-data", help="eval clips (default: the recipe's)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=["ssl", "l1"])
    ap.add_argument("--temporal-weights", type=float, nargs="+", default=None,
                    help="default: 0 and the recipe's structured.temporal_weight")
    ap.add_argument("--steps", type=int, help="finetune steps of ssl (default: the recipe's); the other methods "
                    "get these plus ssl's search steps, so every method trains as many steps")
    ap.add_argument("--ssl-steps", type=int, help="ssl search steps (default: the recipe's)")
    ap.add_argument("--configs", nargs="+", help="method:temporal_weight pairs instead of every method x weight, "
                    "e.g. ssl:0.5 ssl:0 l1:0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_video"), help="bundles go here")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    recipe = resolve_recipe(None if args.recipe else args.model, args.recipe)
    tws = args.temporal_weights if args.temporal_weights is not None else sorted({0.0, recipe.structured.temporal_weight},
                                                                                  reverse=True)
    configs = ([(c.split(":")[0], float(c.split(":")[1])) for c in args.configs] if args.configs
               else [(m, tw) for m in args.methods for tw in tws])
    # the same training steps for every method: --steps counts search and finetune together, so ssl spends
    # ssl_steps of them on its learned-scale search and the other methods finetune all of them
    total = args.steps if args.steps is not None else recipe.finetune.steps
    ssl_steps = args.ssl_steps if args.ssl_steps is not None else recipe.structured.ssl_steps
    rows = []
    for method, tw in configs:
        steps = total + ssl_steps
        out = Path(args.out) / f"{recipe.name}-{method}-tw{tw:g}-b{args.budget:.2f}-s{steps}"
        t0 = time.perf_counter()
        try:
            rep = build_bundle(recipe, out, budget=args.budget, method=method, temporal_weight=tw,
                               weights=args.weights, data=args.data, eval_data=args.eval_data, steps=steps,
                               ssl_steps=ssl_steps, seed=args.seed, progress=False, log=lambda s: None)
        except SlsError as e:
            print(f"{method} tw={tw:g}: {e}", flush=True)
            rows.append({"method": method, "temporal_weight": tw, "budget": args.budget, "error": str(e)})
            continue
        row = row_of(rep, method, tw, time.perf_counter() - t0)
        rows.append(row)
        lat = row["latency_ms_per_frame"]
        print(f"{method:4s} tw={tw:g}: ratio {row['macs_ratio']:.3f}  PSNR-Y {row['psnr_y']['pruned']:.3f} dB "
              f"(drop {row['psnr_y']['drop']:+.3f})  latency {lat['pruned']:.1f} / {lat['dense']:.1f} ms/frame "
              f"= {lat['ratio']:.3f}  ({row['seconds']:.0f}s)", flush=True)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = f"video_pruning{args.tag}"
    meta = {"recipe": recipe.name, "arch": recipe.model.arch, "budget": args.budget, "seed": args.seed,
            "weights": args.weights or recipe.base_weights, "data": args.data or recipe.data_train,
            "eval_data": args.eval_data or recipe.data_eval}
    (res / f"{stem}.json").write_text(json.dumps({"setup": meta, "rows": rows}, indent=2) + "\n")
    md = markdown(rows, args, recipe)
    (res / f"{stem}.md").write_text(md)
    print(md)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
