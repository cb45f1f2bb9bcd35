#!/usr/bin/env python3
"""Benchmark: cost of an SLS search step vs a plain masked-finetune step on EDSR-baseline x4.

Each mode runs in its own process on the same fixed batch (shipped weights, batch 8, LR patch 24): 3 warm-up
steps, then the median of `--steps` timed steps (the real training loop, controller included). Memory: the
process's peak RSS minus its RSS just before training (model, data and controller already in memory), i.e.
what a training step adds at its peak (activations, gradients, Adam state, and for SLS the gates and ranks).

    python benchmarks/search_cost.py [--steps 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class FixedBatch:
    """A sampler that always returns the same batch (so both modes do identical arithmetic)."""

    def __init__(self, lr, hr):
        self.lr, self.hr, self.lr_patch = lr, hr, lr.shape[-1]

    def batch(self):
        return self.lr, self.hr

    def state(self):
        import torch

        return torch.zeros(1)

    def set_state(self, s):
        pass


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_mode(mode: str, steps: int) -> dict:
    import torch

    from sls_deploy.data import PatchSampler, resolve_images
    from sls_deploy.pruning.nm.strategy import masks_for
    from sls_deploy.backends.loading import load_model, resolve_base_weights
    from sls_deploy.config.recipe import resolve_recipe
    from sls_deploy.pruning.nm.search import plan_uniform, split_layers
    from sls_deploy.pruning.nm.sls import SLSSearch
    from sls_deploy.training.loop import TrainConfig, train

    recipe = resolve_recipe("edsr", None)
    model = load_model(recipe, resolve_base_weights(recipe, None))
    split = split_layers(recipe, model, 4)
    lr, hr = PatchSampler(resolve_images("skimage:train"), 4, 24, 8, seed=0).batch()
    if mode == "finetune":
        ctl = masks_for(model, plan_uniform(recipe, split, 0.4, 4, "oneshot"))
    else:  # lambda 0: the search never reaches the budget, so every step is a search step
        h, w = recipe.reference_input_hw()
        ctl = SLSSearch([(c.name, c.macs) for c in split.candidates], sum(d.macs for d in split.dense), 0.3,
                        recipe.sls.__class__(**{**recipe.sls.__dict__, "lam": 0.0}), patch_scale=24 * 24 / (h * w))
    gc.collect()
    before = rss_mb()
    stamps: list[float] = []
    train(model, FixedBatch(lr, hr), TrainConfig(steps=steps + 3, lr=1e-4), controller=ctl, progress=False,
          on_step=lambda s, l: stamps.append(time.perf_counter()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [b - a for a, b in zip(stamps[2:], stamps[3:])]
    return {"mode": mode, "median_step_s": statistics.median(times), "steps_timed": len(times),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1), "step_peak_mb": round(peak - before, 1),
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", choices=["finetune", "search"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.steps)))
        return 0
    res = {}
    for mode in ("finetune", "search"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(res[mode], flush=True)
    res["time_ratio"] = res["search"]["median_step_s"] / res["finetune"]["median_step_s"]
    res["step_memory_ratio"] = res["search"]["step_peak_mb"] / res["finetune"]["step_peak_mb"]
    res["peak_rss_ratio"] = res["search"]["peak_rss_mb"] / res["finetune"]["peak_rss_mb"]
    dest = ROOT / "benchmarks" / "results" / "search_cost.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2) + "\n")
    print(f"search/finetune step time {res['time_ratio']:.2f}x (median of {args.steps}), "
          f"step memory {res['step_memory_ratio']:.2f}x, peak RSS {res['peak_rss_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
