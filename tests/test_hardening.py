"""Bad inputs that used to be accepted silently, end in a traceback, or lose files: each is one line with the
documented exit code, and nothing outside the run's own folder is created, changed or removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import error_line, run_cli
from sls_deploy.core.errors import BundleError, CheckpointError


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, code, fragment", [
    (["--method", "oneshot", "--lam", "1e-9"], 2, "--lam is an SLS search setting"),
    (["--method", "srste", "--alpha", "1.5"], 2, "--alpha is an SLS search setting"),
    (["--method", "sls", "--alpha", "inf"], 2, "SLS alpha must be a finite non-negative number"),
    (["--method", "sls", "--lam", "inf"], 2, "SLS lam must be a finite non-negative number"),
    (["--budget", "0.01"], 2, "smallest reachable budget"),
])
def test_build_usage_errors_leave_no_folder(tmp_path, capsys, tiny_recipe, tiny_weights, extra, code, fragment):
    args = ["build", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--out", str(tmp_path / "b"),
            "--no-progress", "--steps", "0"]
    if "--budget" not in extra:
        args += ["--budget", "0.5"]
    before = _snapshot(tmp_path)
    got, _, err = run_cli(capsys, *args, *extra)
    assert got == code and fragment in error_line(err)
    assert not (tmp_path / "b").exists() and _snapshot(tmp_path) == before


def test_unreachable_budget_then_the_corrected_command_is_not_refused(tmp_path, capsys, tiny_recipe, tiny_weights):
    base = ["search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--out", str(tmp_path / "u1"),
            "--no-progress", "--steps", "0", "--method", "oneshot"]
    code, _, err = run_cli(capsys, *base, "--budget", "0.01")
    assert code == 2 and "smallest reachable budget" in error_line(err) and not (tmp_path / "u1").exists()
    code, _, err = run_cli(capsys, *base, "--budget", "0.5")
    assert code == 0, err


def test_nan_and_integer_weights_are_refused(tmp_path, tiny_recipe):
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.backends.loading import load_model

    recipe = load_recipe(tiny_recipe)
    sd = recipe.build_model().state_dict()
    bad = {k: v.clone() for k, v in sd.items()}
    first = next(iter(bad))
    bad[first][...] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=f"weight '{first}' holds NaN or infinite values"):
        load_model(recipe, tmp_path / "nan.safetensors")
    ints = {k: v.to(torch.int32) for k, v in sd.items()}
    save_file(ints, str(tmp_path / "int.safetensors"))
    with pytest.raises(CheckpointError, match="is int32, not a float tensor"):
        load_model(recipe, tmp_path / "int.safetensors")


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d["layers"][0].update(n=7), "N must be in 1..4, not 7"),
    (lambda d: d.update(m=5), "M must be one of 4, 8, 16, 32, not 5"),
    (lambda d: d["layers"][0].update(n=2.5), "N must be an integer, not 2.5"),
])
def test_a_plan_out_of_schema_is_refused_on_read(tmp_path, change, fragment):
    from sls_deploy.pruning.nm.plan import Plan

    plan = {"model": "m", "method": "oneshot", "budget": 0.5, "m": 4, "reference_output": [64, 64],
            "layers": [{"name": "a", "op": "conv", "weight_shape": [8, 8, 3, 3], "n": 2, "m": 4, "macs_dense": 10}]}
    change(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BundleError, match=fragment):
        Plan.load(tmp_path / "plan.json")


def test_an_edited_plan_is_refused_by_the_next_stage(tmp_path, capsys, tiny_recipe, tiny_weights):
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--out",
                           str(out), "--budget", "0.5", "--method", "oneshot", "--steps", "0", "--no-progress")
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    plan["layers"][0]["name"] = "renamed"
    (out / "plan.json").write_text(json.dumps(plan))
    code, _, err = run_cli(capsys, "finetune", str(out), "--no-progress")
    assert code == 1 and "plan.json was changed after it was written" in error_line(err)


def test_inspect_on_an_empty_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = run_cli(capsys, "inspect", str(empty))
    assert code == 1 and "is empty (0 bytes)" in error_line(err)


def test_unknown_arch_is_a_recipe_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("model: {arch: nosuch, scale: 4}\n")
    code, _, err = run_cli(capsys, "search", "--recipe", str(tmp_path / "r.yaml"), "--budget", "0.5",
                           "--out", str(tmp_path / "b"))
    assert code == 1 and "unknown model architecture 'nosuch'" in error_line(err)


def test_every_artifact_respects_the_umask(tmp_path):
    import os
    import stat

    from sls_deploy.core.atomic import write_text
    from sls_deploy.core.checkpoints import save_weights

    old = os.umask(0o022)
    try:
        save_weights(torch.nn.Conv2d(3, 4, 3), tmp_path / "w.safetensors")
        write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    for name in ("w.safetensors", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_ctrl_c_prints_the_documented_one_line_message(tmp_path, capsys, monkeypatch, tiny_recipe, tiny_weights):
    from sls_deploy.stages import build as build_mod

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "run_finetune", interrupted)
    code, _, err = run_cli(capsys, "build", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights), "--budget",
                           "0.5", "--method", "oneshot", "--steps", "0", "--out", str(tmp_path / "b"), "--no-progress")
    assert code == 130
    assert [l for l in err.splitlines() if not l.startswith(("[", "  "))] == [
        "interrupted: run the same command again to resume from the last checkpoint"]


def test_a_second_writer_is_told_the_folder_is_busy(tmp_path, capsys, tiny_recipe, tiny_weights):
    import fcntl
    import os

    from sls_deploy.core.bundle import LOCK

    out = tmp_path / "b"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds it
    os.write(fd, b"4242")
    try:
        code, _, err = run_cli(capsys, "search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights),
                               "--budget", "0.5", "--method", "oneshot", "--steps", "0", "--out", str(out))
    finally:
        os.close(fd)
    assert code == 1 and "folder busy: another sls-deploy process (pid 4242) is writing" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written


@pytest.mark.parametrize("where", ["file", "readonly"])
def test_unwritable_out_is_one_line(tmp_path, capsys, tiny_recipe, tiny_weights, where):
    import os

    if where == "file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = ro / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", str(tiny_recipe), "--weights", str(tiny_weights),
                           "--budget", "0.5", "--method", "oneshot", "--steps", "0", "--out", str(out))
    assert code == 1 and "cannot write the bundle folder" in error_line(err)


@pytest.mark.parametrize("at, where", [(1, "batch"), (4, "batch"), (2, "after_update")])
def test_ctrl_c_mid_step_then_resume_is_bit_identical(tmp_path, tiny_images, monkeypatch, at, where):
    """SIGINT arrives inside a finetune step (during the batch draw, or right after the optimizer updated the
    weights but before the step was counted); the step completes, a checkpoint is written, and the resumed run
    ends with byte-identical weights to an uninterrupted run."""
    import signal

    from conftest import write_tiny_recipe, write_tiny_weights
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.data.patches import PatchSampler
    from sls_deploy.stages.build import build_bundle

    recipe_path = write_tiny_recipe(tmp_path, tiny_images, finetune={
        "steps": 6, "lr": 1e-3, "batch_size": 2, "lr_patch": 8, "checkpoint_every": 100})
    weights = write_tiny_weights(recipe_path, tmp_path / "w.safetensors")
    kw = dict(budget=0.5, method="oneshot", weights=str(weights), progress=False, log=lambda s: None)
    reference = tmp_path / "ref"
    build_bundle(load_recipe(recipe_path), reference, **kw)

    batch, calls = PatchSampler.batch, []

    def batch_then_sigint(self):
        calls.append(1)
        out = batch(self)
        if where == "batch" and len(calls) == at + 1:
            signal.raise_signal(signal.SIGINT)  # like a Ctrl-C from the terminal, mid-step
        return out

    adam_step = torch.optim.Adam.step

    def step_then_sigint(self, *a, **k):
        res = adam_step(self, *a, **k)
        if where == "after_update" and len(calls) == at + 1:
            signal.raise_signal(signal.SIGINT)  # the weights moved, the step is not counted yet
        return res

    out = tmp_path / "b"
    monkeypatch.setattr(PatchSampler, "batch", batch_then_sigint)
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(load_recipe(recipe_path), out, **kw)
    assert (out / "work" / "finetune.ckpt").is_file()
    monkeypatch.setattr(PatchSampler, "batch", batch)
    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    build_bundle(load_recipe(recipe_path), out, **kw)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_a_bundle_built_with_a_relative_out_resumes_after_a_move(tmp_path, capsys, monkeypatch, tiny_recipe,
                                                                 tiny_weights):
    """The search stage's own weights are found in the bundle wherever it now lives (a relative --out used to be
    recorded as is: run from elsewhere, or moved, the next stage died with a FileNotFoundError traceback); the base
    weights it recorded, once deleted, are a one-line error."""
    import shutil

    work = tmp_path / "a"
    (work / "w").mkdir(parents=True)
    tiny_weights = Path(shutil.move(tiny_weights, work / "w" / tiny_weights.name))  # given relative, below
    monkeypatch.chdir(work)
    args = ["--recipe", tiny_recipe, "--budget", "0.6", "--method", "l1", "--steps", "2", "--precision", "fp32",
            "--no-progress"]
    code, _, err = run_cli(capsys, "build", *args, "--weights", f"w/{tiny_weights.name}", "--out", "b")
    assert code == 0, err
    manifest = json.loads((work / "b" / "manifest.json").read_text())
    assert manifest["stages"]["search"]["init_weights"] == "b/search.safetensors"  # as it was given, relative
    assert manifest["stages"]["search"]["base_weights"] == str(tiny_weights.resolve())  # outside: absolute
    shutil.copytree(work / "b", tmp_path / "moved")  # a move to another disk (in-process: a new lock file)
    shutil.rmtree(work / "b")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "build", *args, "--weights", tiny_weights, "--out", tmp_path / "moved")
    assert code == 0, err
    after = json.loads((tmp_path / "moved" / "manifest.json").read_text())["stages"]
    assert {k: v["inputs"] for k, v in after.items()} == {k: v["inputs"] for k, v in manifest["stages"].items()}
    assert not (tmp_path / "b").exists()
    tiny_weights.unlink()
    code, _, err = run_cli(capsys, "validate", tmp_path / "moved")
    assert code != 0 and "tiny_base.safetensors, are missing" in error_line(err)
