"""The command line: --help everywhere, one-line errors with the right exit codes, a small real build."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sls_deploy.cli import cli
from conftest import CHECKOUT, error_line, run_cli as run


@pytest.mark.parametrize("command", [[]] + [[name] for name in cli.commands])
def test_help_on_every_command(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "Usage:" in out


def test_source_checkout_shim_runs_the_same_cli():
    r = subprocess.run([sys.executable, str(CHECKOUT / "cli.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "build" in r.stdout and "finetune" in r.stdout


@pytest.mark.parametrize("budget, fragment", [("0", "0<x<=1"), ("1.5", "0<x<=1"), ("abc", "not a valid float")])
def test_bad_budget_is_usage_error(capsys, tmp_path, budget, fragment):
    code, _, err = run(capsys, "build", "--model", "edsr", "--budget", budget, "--out", tmp_path / "b")
    assert code == 2
    assert fragment in error_line(err)
    assert not (tmp_path / "b").exists()


def test_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "build", "--model", "resnet50", "--budget", "0.4", "--out", tmp_path / "b")
    assert code == 2
    assert "unknown model 'resnet50'" in error_line(err)


def test_missing_budget(capsys):
    code, _, err = run(capsys, "build", "--model", "edsr")
    assert code == 2 and "--budget" in error_line(err)


def test_missing_checkpoint(capsys, tmp_path, tiny_recipe):
    code, _, err = run(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.4",
                       "--weights", tmp_path / "nope.pth", "--out", tmp_path / "b")
    assert code == 1 and "checkpoint not found" in error_line(err)


def test_checkpoint_of_wrong_scale(capsys, tmp_path, tiny_recipe):
    import torch

    from sls_deploy.models.edsr import EDSR

    wrong = tmp_path / "x2.pth"
    torch.save({"params": EDSR(scale=2, num_feat=16, num_block=2).state_dict()}, wrong)
    code, _, err = run(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.4", "--weights", wrong,
                       "--out", tmp_path / "b")
    assert code == 1 and "'upsample.2.weight'" in error_line(err)


def test_corrupt_image_in_data(capsys, tmp_path, tiny_recipe, tiny_weights):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = run(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.4", "--weights", tiny_weights,
                       "--data", data, "--out", tmp_path / "b", "--no-progress")
    assert code == 1 and "broken.png" in error_line(err)
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_image_smaller_than_patch(capsys, tmp_path, tiny_recipe, tiny_weights):
    import imageio.v3 as iio

    data = tmp_path / "data"
    data.mkdir()
    iio.imwrite(data / "tiny.png", np.zeros((16, 16, 3), np.uint8))  # LR 4x4 < patch 8
    code, _, err = run(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.4", "--weights", tiny_weights,
                       "--data", data, "--out", tmp_path / "b", "--no-progress")
    assert code == 1 and "smaller than one training patch" in error_line(err)


def test_validate_missing_bundle(capsys, tmp_path):
    code, _, err = run(capsys, "validate", tmp_path / "nothing")
    assert code == 1 and "bundle not found" in error_line(err)


def test_corrupt_recipe(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    code, _, err = run(capsys, "build", "--recipe", bad, "--budget", "0.4")
    assert code == 1 and "not valid YAML" in error_line(err)


def test_stage_commands_then_build_summary(capsys, tmp_path, tiny_recipe, tiny_weights):
    out = tmp_path / "bundle"
    code, text, err = run(capsys, "search", "--recipe", tiny_recipe, "--budget", "0.5", "--m", "8",
                          "--weights", tiny_weights, "--out", out)
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["m"] == 8 and plan["macs"]["ratio"] <= 0.5
    assert run(capsys, "finetune", out, "--steps", "2", "--no-progress")[0] == 0
    code, text, err = run(capsys, "export", out)
    assert code == 0, err
    assert f"{len(plan['layers'])} layers keep their N:M pattern" in text
    code, text, err = run(capsys, "validate", out, "--json")
    assert code == 0, err
    rep = json.loads(text)
    assert rep["m"] == 8 and rep["onnx_vs_torch"]["passed"]
    # a different budget into the same folder is refused, and nothing there changes
    before = (out / "model.onnx").read_bytes()
    code, _, err = run(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.3", "--weights", tiny_weights,
                       "--out", out, "--no-progress")
    assert code == 1 and "holds another bundle" in error_line(err)
    assert (out / "model.onnx").read_bytes() == before


def test_finetune_refuses_to_overwrite_interrupted_run(capsys, tmp_path, tiny_recipe, tiny_weights):
    out = tmp_path / "bundle"
    assert run(capsys, "search", "--recipe", tiny_recipe, "--budget", "0.4", "--weights", tiny_weights,
               "--out", out)[0] == 0
    (out / "work").mkdir()
    (out / "work" / "finetune.ckpt").write_bytes(b"left by an interrupted run")
    code, _, err = run(capsys, "finetune", out, "--no-progress")
    assert code == 1 and "cannot read" in error_line(err) and "--restart" in error_line(err)
    assert (out / "work" / "finetune.ckpt").read_bytes() == b"left by an interrupted run"
    code, _, err = run(capsys, "finetune", out, "--resume", "--no-progress")
    assert code == 1 and "cannot read" in error_line(err)
    code, _, err = run(capsys, "finetune", out, "--restart", "--steps", "1", "--no-progress")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_train_never_overwrites_a_file_without_force(tmp_path, capsys):
    from conftest import error_line, run_cli

    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--model", "edsr", "--out", str(mine), "--steps", "1")
    assert code == 1 and "exists; choose another --out or pass --force" in error_line(err)
    assert mine.read_text() == "keep me"
    code, _, err = run_cli(capsys, "train", "--model", "edsr", "--out", str(mine / "sub.safetensors"), "--steps", "1")
    assert code == 1 and "is a file, not a folder" in error_line(err)


@pytest.mark.parametrize("seed", ["1e20", "-1", str(2**40)])
def test_seed_out_of_range_is_a_usage_error(tmp_path, capsys, seed):
    from conftest import error_line, run_cli

    code, _, err = run_cli(capsys, "build", "--model", "edsr", "--budget", "0.4", "--seed", seed,
                           "--out", str(tmp_path / "b"))
    assert code == 2 and "--seed" in error_line(err) and not (tmp_path / "b").exists()
