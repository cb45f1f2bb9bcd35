#!/usr/bin/env python3
"""Benchmark: does the channels_last memory format speed up training? EDSR-baseline x4 on this machine's device.

Times sls-deploy's own training loop (training.loop.train: L1, Adam; the loop puts the model and every 4-D batch
in channels_last when asked) on random batches, contiguous (NCHW) vs channels_last, each in FP32 and, with
--amp, in bf16 autocast. Rounds are interleaved (every format once per round, the order alternating) so both see
the same machine load; each round builds a fresh model, runs --warmup untimed steps, then --steps timed steps
(the loop reads the loss after every step, so a step is complete when it is timed). Reported: the median seconds
per step over the rounds, steps/s and images/s, the ratio of the medians channels_last / contiguous and the
median of the per-round ratios (the two formats of one round ran back to back, under the same load).

    python benchmarks/channels_last.py [--device cpu] [--batch 8] [--patch 24] [--rounds 5] [--steps 5]
        [--amp] [--out benchmarks/results/channels_last_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sls_deploy.config.recipe import load_recipe, recipe_for_model  # noqa: E402
from sls_deploy.core.device import check_amp, resolve_device  # noqa: E402
from sls_deploy.training.loop import TrainConfig, train  # noqa: E402


class Batches:
    def __init__(self, batch: int, patch: int, scale: int, n: int = 4):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(batch, 3, patch, patch, generator=g),
                       torch.rand(batch, 3, patch * scale, patch * scale, generator=g)) for _ in range(n)]
        self.i = 0

    def batch(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]

    def state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def per_step(recipe, device, batches, amp: str, channels_last: bool, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = recipe.build_model().to(device)
    stamps: list[float] = []
    train(model, batches, TrainConfig(steps=warmup + steps, lr=1e-4, checkpoint_every=0, amp=amp,
                                      channels_last=channels_last),
          progress=False, on_step=lambda done, loss: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[warmup - 1]) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", action="store_true", help="also bf16 autocast rows")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "channels_last_cpu.json")
    args = ap.parse_args(argv)
    if min(args.batch, args.patch, args.rounds, args.steps, args.warmup) < 1:
        ap.error("--batch, --patch, --rounds, --steps and --warmup must be >= 1")
    device = resolve_device(args.device)
    recipe = load_recipe(recipe_for_model("edsr"))
    batches = Batches(args.batch, args.patch, recipe.scale)
    amps = ["off"] + (["bf16"] if args.amp else [])
    configs = [(amp, cl) for amp in amps for cl in (False, True)]
    for amp in amps:
        check_amp(amp, device)
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in (configs if r % 2 == 0 else list(reversed(configs))):
            times[c].append(per_step(recipe, device, batches, *c, args.warmup, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{a}{' cl' if cl else ''} {times[(a, cl)][-1]:.3f}s"
                                                          for a, cl in configs), file=sys.stderr, flush=True)
    rows = []
    for amp, cl in configs:
        med = statistics.median(times[(amp, cl)])
        base = statistics.median(times[(amp, False)])
        paired = statistics.median(t / b for t, b in zip(times[(amp, cl)], times[(amp, False)]))
        rows.append({"amp": "fp32" if amp == "off" else amp, "memory_format": "channels_last" if cl else "contiguous",
                     "median_s_per_step": round(med, 4), "steps_per_s": round(1 / med, 3),
                     "images_per_s": round(args.batch / med, 2), "ratio_vs_contiguous": round(med / base, 3),
                     "median_of_round_ratios": round(paired, 3),
                     "per_round_s": [round(t, 4) for t in times[(amp, cl)]]})
    res = {"benchmark": "benchmarks/channels_last.py", "model": recipe.describe_model(),
           "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "cores": os.cpu_count(), "torch": torch.__version__, "batch": args.batch, "lr_patch": args.patch,
           "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "rows": rows,
           "note": "shared machine; interleaved rounds, medians. GPU: not measured here (benchmarks/gpu_check.py)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    for r in rows:
        print(f"{r['amp']} {r['memory_format']}: {r['median_s_per_step']} s/step ({r['images_per_s']} images/s), "
              f"x{r['ratio_vs_contiguous']} of contiguous (median of round ratios x{r['median_of_round_ratios']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
