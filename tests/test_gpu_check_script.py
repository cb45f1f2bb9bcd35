"""benchmarks/gpu_check.py on CPU: argument handling, the no-CUDA refusal (exit 2, nothing written), the time
budget, and a dry run of its sections on the CPU with a tiny recipe (the GPU figures need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import CHECKOUT, write_tiny_recipe, write_tiny_weights

SCRIPT = CHECKOUT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv", [[], ["--out", "o", "--skip", "nosuch"], ["--out", "o", "--build-steps", "0"],
                                  ["--out", "o", "--resume-steps", "1"], ["--out", "o", "--budget-s", "0"],
                                  ["--out", "o", "--recipe", "r.yaml"], ["--out", "o", "--patch", "x"]])
def test_usage_errors_exit_2(gc, argv, capsys):
    with pytest.raises(SystemExit) as e:
        gc.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_without_cuda_it_stops_at_once_and_writes_nothing(gc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert gc.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error: no CUDA here") and "--cpu-dry-run" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_as_a_command(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_budget_too_small_for_any_section_fails(gc, tmp_path, capsys):
    out = tmp_path / "out"
    assert gc.main(["--out", str(out), "--cpu-dry-run", "--budget-s", "1"]) == 1
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["status"] == "failed: no section ran (time budget or --skip)"
    assert all("time budget" in v["skipped"] or "CUDA only" in v["skipped"] for v in res["sections"].values())


def test_dry_run_of_throughput_and_resume_on_the_cpu(gc, tmp_path, tiny_images, capsys):
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    rc = gc.main(["--out", str(out), "--cpu-dry-run", "--recipe", str(recipe), "--weights", str(weights),
                  "--skip", "build", "--skip", "torchrun", "--throughput-steps", "1", "--resume-steps", "2",
                  "--patch", "8", "--batch", "2", "--work", str(tmp_path / "work")])
    res = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and res["status"] == "passed (3 sections)", res["status"]
    s = res["sections"]
    assert s["env"]["device"] == "cpu" and s["env"]["torch"] == torch.__version__
    rows = {(r["amp"], r["channels_last"]): r for r in s["throughput"]["rows"]}
    assert len(rows) == 6 and rows[("fp32", False)]["steps_per_s"] > 0 and rows[("bf16", True)]["images_per_s"] > 0
    assert rows[("fp16", False)]["steps_per_s"] is None and "needs a CUDA device" in rows[("fp16", False)]["note"]
    if importlib.util.find_spec("basicsr") is None:
        assert [(r["loop"], r["amp"], r["note"]) for r in s["throughput"]["basicsr_rows"]] == [
            ("BasicSR", amp, "not measured (BasicSR not installed)") for amp in ("fp32", "bf16")]
    r = s["resume"]
    assert r["checkpoints_cpu_only"] and r["gpu_then_gpu_bit_identical"]  # all CPU here: every leg bit-identical
    assert set(r["max_abs_weight_diff"].values()) == {0.0}
    assert r["legs"]["gpu_then_cpu"]["checkpoint_step"] == 1 and r["legs"]["gpu_then_cpu"]["checkpoint_devices"] == ["cpu"]
    assert s["build"] == {"skipped": "--skip"} and s["oom"] == {"skipped": "CUDA only (it fills the GPU's memory)"}
    assert "passed (3 sections)" in capsys.readouterr().out


def test_oom_section_bookkeeping_on_the_cpu(gc, tmp_path, tiny_images, monkeypatch):
    """The oom section's own logic with a small "big" batch whose loss raises what CUDA raises (on a GPU the
    allocation itself fails)."""
    from sls_deploy.training import loop

    recipe = write_tiny_recipe(tmp_path, tiny_images)
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    args = gc.parse_args(["--out", str(tmp_path / "o"), "--cpu-dry-run", "--recipe", str(recipe), "--weights",
                          str(weights), "--oom-batch", "3", "--oom-patch", "8"])
    real = loop.F.l1_loss

    def l1(a, b):
        if a.shape[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.25 GiB")
        return real(a, b)

    monkeypatch.setattr(loop.F, "l1_loss", l1)
    (tmp_path / "work").mkdir()
    res = gc.section_oom(gc.Ctx(args, tmp_path / "work"))
    assert res["passed"] and res["checkpoint_step_kept"] == 2, res
    assert "cpu out of memory at step 3 of finetune on cpu (batch 3 x LR patch 8x8)" in res["message"]
