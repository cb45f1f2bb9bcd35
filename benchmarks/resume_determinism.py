#!/usr/bin/env python3
"""Ctrl-C and resume, for real: does an interrupted finetune resume to bit-identical weights?

Builds one EDSR bundle's plan (`search --method oneshot`), finetunes it once without interruption (the
reference), then RUNS times: `sls-deploy finetune` in a subprocess, a real SIGINT after a random delay, the same
command again to finish, and the sha256 of model.safetensors compared with the reference. Results go to
benchmarks/results/resume_determinism.json.

    python benchmarks/resume_determinism.py [--runs 10] [--steps 40] [--seed 0] [--workers N]

``--workers N`` sets the recipe's data.workers (training batches made by N loader processes; the default auto
uses none for the shipped photos) and writes resume_determinism_workers<N>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finetune(bundle: Path, steps: int, interrupt_after: float | None = None) -> tuple[int, str]:
    p = subprocess.Popen(CLI + ["finetune", str(bundle), "--steps", str(steps), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        p.send_signal(signal.SIGINT)
    out, err = p.communicate()
    return p.returncode, err.strip().splitlines()[-1] if err.strip() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="data.workers of the recipe (default: auto)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="resume-"))
    base = work / "base"
    model = ["--model", "edsr"]
    if args.workers is not None:
        import yaml

        recipe = yaml.safe_load((ROOT / "sls_deploy" / "recipes" / "edsr.yaml").read_text())
        recipe["data"]["workers"] = args.workers
        (work / "edsr.yaml").write_text(yaml.safe_dump(recipe))
        model = ["--recipe", str(work / "edsr.yaml")]
    # --target none: the recipe's default target (trt) gives 64-channel EDSR no 2:4 saving and refuses N:M
    subprocess.run(CLI + ["search", *model, "--budget", "0.5", "--method", "oneshot", "--target", "none",
                          "--steps", "0", "--out", str(base), "--no-progress"], check=True, capture_output=True)
    ref = work / "ref"
    shutil.copytree(base, ref)
    t0 = time.perf_counter()
    code, _ = finetune(ref, args.steps)
    full = time.perf_counter() - t0
    assert code == 0, "reference finetune failed"
    want = sha(ref / "model.safetensors")
    rows = []
    for i in range(args.runs):
        b = work / f"run{i}"
        shutil.copytree(base, b)
        delay = rng.uniform(0.25, 0.9) * full
        code, line = finetune(b, args.steps, interrupt_after=delay)
        ckpt = b / "work" / "finetune.ckpt"
        import torch

        at = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"]) if ckpt.is_file() else None
        code2, _ = finetune(b, args.steps)
        same = (b / "model.safetensors").is_file() and sha(b / "model.safetensors") == want
        rows.append({"run": i, "sigint_after_s": round(delay, 2), "exit_code": code, "message": line,
                     "checkpoint_step": at, "resume_exit_code": code2, "bit_identical": same})
        print(f"run {i}: SIGINT after {delay:.1f}s -> exit {code} ({line!r}), checkpoint at step {at}, "
              f"resumed exit {code2}, identical: {same}", flush=True)
    n = sum(r["bit_identical"] for r in rows)
    print(f"bit-identical after resume: {n} of {len(rows)} (reference finetune {full:.1f}s, {args.steps} steps)")
    suffix = "" if args.workers is None else f"_workers{args.workers}"
    dest = ROOT / "benchmarks" / "results" / f"resume_determinism{suffix}.json"
    dest.write_text(json.dumps({"steps": args.steps, "reference_seconds": round(full, 1), "identical": n,
                                **({"data_workers": args.workers} if args.workers is not None else {}),
                                "runs": rows}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if n == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
