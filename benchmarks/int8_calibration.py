#!/usr/bin/env python3
"""Benchmark: INT8 graph quality per calibration method (max, percentile 99.99, entropy) on a built bundle.

For each method: re-export model.int8.onnx from the bundle with that method, then measure its eval Y-PSNR
and its PSNR against the FP32 PyTorch output (ONNX Runtime, CPU). Restores the recipe's method at the end.
Results go to benchmarks/results/int8_calibration.json.

    python benchmarks/int8_calibration.py runs/edsr-b0.40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.data import load_pair, resolve_images  # noqa: E402
from sls_deploy.core.bundle import WEIGHTS  # noqa: E402
from sls_deploy.stages.build import reopen  # noqa: E402
from sls_deploy.stages.export import run_export  # noqa: E402
from sls_deploy.backends.loading import load_model  # noqa: E402
from sls_deploy.stages.validate_image import precision_quality  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    args = ap.parse_args()
    run = reopen(Path(args.bundle), lambda s: None)
    bundle, recipe = run.bundle, run.recipe
    import torch

    pruned = load_model(recipe, bundle.path(WEIGHTS))
    refs = {}
    for f in resolve_images(recipe.data_eval):
        hr, lr = load_pair(f, recipe.scale)
        with torch.no_grad():
            refs[f.name] = (hr, lr, pruned(lr).clamp(0, 1).numpy())
    ch = recipe.metric_channel
    fp32 = precision_quality(bundle.path("model.onnx"), refs, recipe.scale, ch)
    rows = {"fp32_graph": fp32}
    for method in ("max", "percentile", "entropy"):
        run_export(reopen(bundle.root, lambda s: None, calib_method=method))
        q = precision_quality(bundle.path("model.int8.onnx"), refs, recipe.scale, ch)
        q["drop_db"] = fp32[f"psnr_{ch}"] - q[f"psnr_{ch}"]
        rows[method] = q
        print(f"{method:10s} PSNR-{ch.upper()} {q[f'psnr_{ch}']:.3f} dB (FP32 graph {fp32[f'psnr_{ch}']:.3f}, "
              f"drop {q['drop_db']:.3f}), vs FP32 PyTorch {q['psnr_vs_torch_fp32']:.2f} dB", flush=True)
    run_export(run)  # back to the bundle's method
    dest = ROOT / "benchmarks" / "results" / "int8_calibration.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"bundle": str(bundle.root), "islands": json.loads(
        bundle.path("plan.json").read_text())["fp32_islands"], "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
