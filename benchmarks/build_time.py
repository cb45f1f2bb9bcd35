#!/usr/bin/env python3
"""Benchmark: wall time of `sls-deploy build --model edsr --budget 0.4` (or `--model basicvsr --budget 0.5`)
from a fresh checkout.

Clones the committed HEAD into a temporary folder, installs it as the README says (timed separately),
runs the build there `--repeat` times (each into a fresh bundle) and prints the median wall time with the
report's MACs ratio and PSNR. Results go to benchmarks/results/build_time.json.

    python benchmarks/build_time.py [--model edsr] [--repeat 1] [--budget 0.4] [--reuse-venv PATH]
    (results: build_time.json for edsr, build_time_<model>.json otherwise)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--model", default="edsr", help="built-in recipe (edsr, basicvsr, streamvsr, ...)")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--reuse-venv", help="Use this existing virtual environment instead of installing anew.")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sls-bench-"))
    checkout = work / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    install_s = None
    if args.reuse_venv:
        venv = Path(args.reuse_venv)
        sh([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "."], checkout)
    else:
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install_s = sh([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "."], checkout)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    runs = []
    for i in range(args.repeat):
        out = work / f"bundle-{i}"
        # run from an empty folder so the installed package, not the checkout, is used
        secs = sh(["sls-deploy", "build", "--model", args.model, "--budget", str(args.budget), "--out", str(out),
                   "--no-progress"], work, env)
        rep = json.loads((out / "report.json").read_text())
        runs.append({"seconds": round(secs, 1), "macs_ratio": rep["macs"]["ratio"],
                     "psnr": {k: rep["psnr"][k] for k in ("bicubic", "dense", "pruned", "pruned_onnx")},
                     "onnx_max_abs": rep["onnx_vs_torch"]["max_abs"], "stage_seconds": rep["stage_seconds"]})
        runs[-1]["latency"] = rep.get("latency")
        print(f"run {i + 1}: {secs:.1f}s, MACs ratio {rep['macs']['ratio']:.3f}, "
              f"PSNR-Y pruned {rep['psnr']['pruned']:.2f} dB (dense {rep['psnr']['dense']:.2f})", flush=True)
    result = {"command": f"sls-deploy build --model {args.model} --budget {args.budget}",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "install_seconds": None if install_s is None else round(install_s, 1),
              "build_seconds_median": statistics.median(r["seconds"] for r in runs), "runs": runs}
    dest = ROOT / "benchmarks" / "results" / ("build_time.json" if args.model == "edsr" else
                                              f"build_time_{args.model}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
