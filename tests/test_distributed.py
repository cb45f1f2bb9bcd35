"""Search and finetune under torchrun with two CPU processes (gloo): identical plans, one bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import same_package_env


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_sls_build(tmp_path, tiny_recipe, tiny_weights):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sls_deploy.cli", "build", "--recipe",
           str(tiny_recipe), "--budget", "0.45", "--method", "sls", "--weights", str(tiny_weights), "--out", str(out),
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=same_package_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert plan["search"]["world_size"] == 2  # both ranks searched, and their plans agreed (else PlanError)
    assert manifest["stages"]["finetune"]["result"]["world_size"] == 2
    assert plan["macs"]["ratio"] <= 0.45
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_vs_torch"]["passed"]
    assert r.stdout.count("PSNR-Y bicubic") == 1  # only rank 0 reports
