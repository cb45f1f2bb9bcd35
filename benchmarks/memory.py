#!/usr/bin/env python3
"""Benchmark: peak memory (RSS) and wall time of the quick-start `build` and of `validate --no-latency` on its bundle.

Each command runs as its own process (`python cli.py ...` from this checkout); its peak RSS is the kernel's
``ru_maxrss`` from ``os.wait4`` (what ``/usr/bin/time -v`` prints as "Maximum resident set size"), and a sampler
reads /proc/<pid>/status every 0.2 s so the peak can be attributed to the stage printing at that moment
(``[k/4] stage``). `validate` runs on a fresh copy of the built bundle each time (a validate that is up to date
would not run), `--validate-repeat` times.

    python benchmarks/memory.py [--model edsr] [--budget 0.4] [--seed 0] [--bundle DIR (skip the build)]
                                [--validate-repeat 1] [--tag NAME] [--work DIR]
    (results: benchmarks/results/memory{_TAG}.json and .md; each command's full output: WORK/<command>.log)

`validate` is measured twice per repeat: with `--no-latency` and with the latency timing (the build's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str], cwd: Path, log_path: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, peak RSS (MB) and the peak RSS of each stage it announced."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = [(0.0, "start")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = _rss_kb(proc.pid)
            if r is not None:
                samples.append((time.perf_counter() - t0, r))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = []
    for line in proc.stdout:  # the stage lines mark where each stage starts
        log.append(line.rstrip("\n"))
        s = line.strip()
        if s.startswith("[") and "]" in s and s.endswith("..."):
            marks.append((time.perf_counter() - t0, s.split("]", 1)[1].strip(" .")))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log_path is not None:
        log_path.write_text("\n".join(log) + "\n")
    stages: dict[str, float] = {}
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        peak = max((r for t, r in samples if start <= t < end), default=0)
        stages[name] = round(peak / 1024, 1)
    return {"command": " ".join(cmd), "exit": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stage_peak_rss_mb": stages, "log_tail": log[-12:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edsr")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, help="An already built bundle: measure validate only.")
    ap.add_argument("--validate-repeat", type=int, default=1)
    ap.add_argument("--tag", default="", help="Suffix of the result files (memory_TAG.json).")
    ap.add_argument("--work", type=Path, help="Folder for the bundle, its copies and the logs (default: a new "
                                              "temporary folder).")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="sls-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, str(ROOT / "cli.py")]
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_avg_at_start": os.getloadavg()}}
    if args.bundle is None:
        bundle = work / "bundle"
        b = measure([*py, "build", "--model", args.model, "--budget", str(args.budget), "--seed", str(args.seed),
                     "--out", str(bundle), "--no-progress"], ROOT, work / "build.log")
        print(f"build: exit {b['exit']}, {b['wall_s']} s, peak RSS {b['peak_rss_mb']} MB, "
              f"by stage {b['stage_peak_rss_mb']}", flush=True)
        result["build"] = b
        if b["exit"] != 0:
            print("\n".join(b["log_tail"]), file=sys.stderr)
            return 1
    else:
        bundle = args.bundle
    result["validate"] = []
    for i in range(args.validate_repeat):
        for flags in (["--no-latency"], []):
            copy = work / f"validate-{i}"
            shutil.copytree(bundle, copy)
            tag = "no-latency" if flags else "latency"
            v = measure([*py, "validate", str(copy), *flags, "--no-progress"], ROOT, work / f"validate-{tag}-{i}.log")
            shutil.rmtree(copy)
            print(f"validate {' '.join(flags)}: exit {v['exit']}, {v['wall_s']} s, peak RSS {v['peak_rss_mb']} MB",
                  flush=True)
            result["validate"].append(v)
    rep = json.loads((bundle / "report.json").read_text())
    result["figures"] = {"macs_ratio": rep["macs"]["ratio"], "psnr": {k: rep["psnr"][k] for k in
                         ("bicubic", "dense", "pruned", "pruned_onnx")},
                         "precisions_psnr": {k: v.get(f"psnr_{rep['psnr']['channel']}")
                                             for k, v in rep.get("precisions", {}).items()},
                         "onnx_max_abs": rep["onnx_vs_torch"]["max_abs"],
                         "latency_ratio": [s["ratio_pruned_over_dense"] for s in
                                           rep.get("latency", {}).get("sizes", [])]}
    result["bundle"] = str(bundle)
    name = f"memory_{args.tag}" if args.tag else "memory"
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["Peak RSS (ru_maxrss of the process) and wall time; "
             f"{result['machine']['cpus']} CPUs (shared: load average {result['machine']['load_avg_at_start'][0]:.1f} "
             "at start).", "", "| command | exit | wall s | peak RSS MB | peak RSS by stage MB |", "|---|---|---|---|---|"]
    for r in ([result["build"]] if "build" in result else []) + result["validate"]:
        cmd = r["command"].split("cli.py ", 1)[1]
        by = ", ".join(f"{k} {v}" for k, v in r["stage_peak_rss_mb"].items() if k != "start" or v)
        lines.append(f"| `{cmd}` | {r['exit']} | {r['wall_s']} | {r['peak_rss_mb']} | {by} |")
    f = result["figures"]
    lines += ["", f"Figures: MACs ratio {f['macs_ratio']:.3f}; PSNR-Y bicubic / dense / pruned / pruned ONNX "
              f"{f['psnr']['bicubic']:.3f} / {f['psnr']['dense']:.3f} / {f['psnr']['pruned']:.3f} / "
              f"{f['psnr']['pruned_onnx']:.3f} dB; ONNX vs PyTorch max abs {f['onnx_max_abs']:.1e}; "
              f"ORT latency pruned/dense {', '.join(f'{x:.3f}' for x in f['latency_ratio']) or 'not measured'}."]
    (dest / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
