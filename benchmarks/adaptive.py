#!/usr/bin/env python3
"""Adaptive patch-wise inference on EDSR: a family of members, three routers, PSNR-Y and ONNX Runtime latency.

Builds the family if ``--family`` does not hold one yet (``sls-deploy build --model edsr --budget ...``, the
recipe's default method and steps for every member), runs ``sls-deploy route`` on it (routers fitted and
calibrated on train patches only), then times on ONNX Runtime CPU, interleaved, medians over ``--runs``: each
single candidate on every whole eval image, and each router's whole pipeline (router graph on the patches, every
chosen member's graph on its patches, stitching). Results: benchmarks/results/adaptive.json, .md and .png.

    python benchmarks/adaptive.py [--family runs/edsr-family] [--budgets 0.25 0.4 0.6] [--patch 48 --stride 44]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.adaptive.family import is_family, load_family  # noqa: E402
from sls_deploy.adaptive.patches import extract, grid, stitch  # noqa: E402
from sls_deploy.adaptive.run import MAP_PLOT, PLOT, route, router_file  # noqa: E402
from sls_deploy.backends.latency import time_side_by_side  # noqa: E402
from sls_deploy.backends.sessions import timed_session  # noqa: E402
from sls_deploy.cli import main as cli_main  # noqa: E402
from sls_deploy.config.recipe import load_recipe  # noqa: E402
from sls_deploy.core.bundle import ONNX, RECIPE  # noqa: E402
from sls_deploy.data.images import load_pair  # noqa: E402
from sls_deploy.data.sources import resolve_images  # noqa: E402
from sls_deploy.report.adaptive import table as adaptive_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def onnx_of(family, name: str) -> Path:
    if name == "dense":  # the dense reference graph every bundle's validate stage exports
        return family.path(family.members[0]) / "work" / "dense.onnx"
    return family.root / name / ONNX


def latency(family, rep: dict, size: int, stride: int, runs: int, threads: int) -> dict:
    recipe = load_recipe(family.path(family.members[0]) / RECIPE)
    deg = recipe.adapter.degradation(recipe.model)
    names = [c["name"] for c in rep["candidates"]]
    sessions = {n: timed_session(onnx_of(family, n), threads)[0] for n in names if n != "bicubic"}
    routers = {r: timed_session(family.root / router_file(r), threads)[0] for r in rep["routers"]}
    images = []
    for f in resolve_images(recipe.data_eval):
        lr = load_pair(f, recipe.scale, deg)[1]
        h, w = lr.shape[-2:]
        pos = grid(h, w, size, stride)
        images.append((lr, pos, extract(lr, pos, size).numpy()))

    def run_candidate(name: str, x: np.ndarray) -> torch.Tensor:
        if name == "bicubic":
            return deg.baseline(torch.from_numpy(x))
        return torch.from_numpy(sessions[name].run(None, {"lr": x})[0])

    def single(name):
        return lambda: [run_candidate(name, lr.numpy()) for lr, _, _ in images]

    def routed(router):
        def call():
            for lr, pos, patches in images:
                choice = routers[router].run(None, {"lr_patches": patches})[0]
                out = torch.empty(len(pos), 3, size * recipe.scale, size * recipe.scale)
                for k, name in enumerate(names):
                    idx = np.nonzero(choice == k)[0]
                    if idx.size:
                        out[torch.from_numpy(idx)] = run_candidate(name, patches[idx])
                stitch(out, pos, recipe.scale, *lr.shape[-2:])
        return call

    calls = {f"{n} (whole image)": single(n) for n in names}
    calls.update({f"router {r}": routed(r) for r in rep["routers"]})
    t = time_side_by_side(calls, warmup=1, runs=runs)
    dense = t["dense (whole image)"].median_ms
    return {"threads": threads, "runs": runs, "images": len(images),
            "median_ms": {k: round(v.median_ms, 2) for k, v in t.items()},
            "ratio_over_dense": {k: round(v.median_ms / dense, 4) for k, v in t.items()}}


def table(rep: dict, lat: dict) -> str:
    """The route report's table, then the measured latencies."""
    lines = [adaptive_table(rep), f"ONNX Runtime CPU ({lat['threads']} threads), all {lat['images']} eval images per "
             f"call, medians of {lat['runs']} interleaved runs (train grid coverage {rep['train_coverage']:.3f}):", "",
             "| run | median ms | latency / dense whole image |", "|---|---|---|"]
    for k, ms in lat["median_ms"].items():
        lines.append(f"| {k} | {ms:.1f} | {lat['ratio_over_dense'][k]:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="runs/edsr-family")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.4, 0.6])
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--stride", type=int, default=44)
    ap.add_argument("--train-patches", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the result files (adaptive<tag>.json)")
    ap.add_argument("--nested", action="store_true", help="build the family with `build --nested` (one shared "
                    "weight set) when --family does not exist yet")
    args = ap.parse_args()
    fam_dir = Path(args.family)
    if not is_family(fam_dir):
        argv = ["build", "--model", "edsr", "--out", str(fam_dir), "--no-progress"]
        for b in args.budgets:
            argv += ["--budget", str(b)]
        if args.nested:
            argv.append("--nested")
        if cli_main(argv):
            return 1
    family = load_family(fam_dir)
    rep = route(fam_dir, size=args.patch, stride=args.stride, train_patches=args.train_patches, steps=args.steps)
    lat = latency(family, rep, args.patch, args.stride, args.runs, args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"adaptive": rep, "latency": lat}
    (RESULTS / f"adaptive{args.tag}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"adaptive{args.tag}.md").write_text(table(rep, lat))
    shutil.copyfile(fam_dir / PLOT, RESULTS / f"adaptive{args.tag}.png")
    shutil.copyfile(fam_dir / MAP_PLOT, RESULTS / f"adaptive{args.tag}_map.png")
    print(table(rep, lat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
