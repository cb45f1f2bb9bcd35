"""Issue 23: validate's quality gate (the pruned model against the dense one and the task's baseline), the
search's share of --steps, and a finetune making export and validate stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RECIPE, error_line, run_cli, write_tiny_recipe, write_tiny_weights
from sls_deploy.config.recipe import ValidateSection, load_recipe, recipe_for_model
from sls_deploy.core.errors import RecipeError
from sls_deploy.stages.validate_gate import gate_failure, quality_gate

GATE_ON = {**TINY_RECIPE["validate"], "max_drop_vs_dense_db": 0.5, "min_gain_vs_baseline_db": 0.0}


# --- the gate itself -----------------------------------------------------------------------------------------

def test_the_issue_figures_give_one_line_naming_them():
    gate = quality_gate(ValidateSection(), "bicubic", 28.78, 29.98, 16.98)
    assert not gate["passed"] and gate["rows"][0]["failed"] == ["dense", "baseline"]
    assert gate["failure"] == ("quality gate: pruned 16.98 dB is 13.00 dB below dense 29.98 dB (limit 0.5 dB) "
                               "and 11.80 dB below bicubic 28.78 dB")


def test_each_limit_alone_and_its_boundary():
    val = ValidateSection()
    assert quality_gate(val, "bicubic", 28.0, 30.0, 29.5)["passed"]  # exactly at the dense limit
    assert gate_failure(quality_gate(val, "bicubic", 28.0, 30.0, 29.4)) == \
        "quality gate: pruned 29.40 dB is 0.60 dB below dense 30.00 dB (limit 0.5 dB)"
    assert quality_gate(val, "bicubic", 28.0, 28.2, 28.0)["passed"]  # exactly at bicubic
    assert gate_failure(quality_gate(val, "blurred input", 28.0, 28.2, 27.9)) == \
        "quality gate: pruned 27.90 dB is 0.10 dB below blurred input 28.00 dB"
    strict = ValidateSection(min_gain_vs_baseline_db=0.5)
    assert gate_failure(quality_gate(strict, "bicubic", 28.0, 28.4, 28.3)) == \
        "quality gate: pruned 28.30 dB is only 0.30 dB above bicubic 28.00 dB (limit +0.5 dB)"
    off = ValidateSection(max_drop_vs_dense_db=None, min_gain_vs_baseline_db=None)
    gate = quality_gate(off, "bicubic", 28.0, 30.0, 10.0)
    assert gate["passed"] and gate["failure"] is None and gate["rows"][0]["drop_vs_dense_db"] == 20.0


def test_each_graph_gets_the_baseline_limit_and_the_dense_limit_plus_its_precision_drop():
    gate = quality_gate(ValidateSection(), "bicubic", 28.0, 30.0, 29.8, {"fp32": 29.8, "fp16": 29.45, "int8": 29.05})
    limits = [r["max_drop_vs_dense_db"] for r in gate["rows"]]
    assert limits == pytest.approx([0.5, 0.55, 0.6, 1.0])  # + fp32 0.05 / fp16 0.1 / int8 0.5
    assert gate["passed"]
    gate = quality_gate(ValidateSection(), "bicubic", 28.0, 30.0, 29.8, {"fp32": 29.8, "fp16": 29.35})
    assert gate_failure(gate) == "quality gate: fp16 graph 29.35 dB is 0.65 dB below dense 30.00 dB (limit 0.6 dB)"
    gate = quality_gate(ValidateSection(), "bicubic", 29.5, 30.0, 29.8, {"fp32": 29.8, "fp16": 29.6, "int8": 29.2})
    assert gate_failure(gate) == "quality gate: int8 graph 29.20 dB is 0.30 dB below bicubic 29.50 dB"
    gate = quality_gate(ValidateSection(), "bicubic", 29.9, 30.0, 29.8, {"fp32": 29.8})
    assert gate_failure(gate) == ("quality gate: pruned 29.80 dB is 0.10 dB below bicubic 29.90 dB (and 1 more; "
                                  "see report.json)")


# --- the recipe fields ---------------------------------------------------------------------------------------

def _edsr_with(tmp_path, **validate) -> Path:
    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    raw["validate"].update(validate)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_recipes_state_their_limits(tmp_path):
    limits = {m: (load_recipe(recipe_for_model(m)).validate.max_drop_vs_dense_db,
                  load_recipe(recipe_for_model(m)).validate.min_gain_vs_baseline_db)
              for m in ("edsr", "edsr_paper_x4", "basicvsr", "streamvsr", "deblur")}
    assert limits == {"edsr": (0.5, 0.0), "edsr_paper_x4": (0.5, 0.0), "basicvsr": (0.3, 0.0),
                      "streamvsr": (0.3, 0.0), "deblur": (0.3, 0.0)}
    v = load_recipe(_edsr_with(tmp_path, max_drop_vs_dense_db=None, min_gain_vs_baseline_db=-1)).validate
    assert (v.max_drop_vs_dense_db, v.min_gain_vs_baseline_db) == (None, -1.0)
    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    del raw["validate"]["max_drop_vs_dense_db"], raw["validate"]["min_gain_vs_baseline_db"]
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw))
    v = load_recipe(tmp_path / "d.yaml").validate  # a recipe that does not say: the gate is on
    assert (v.max_drop_vs_dense_db, v.min_gain_vs_baseline_db) == (0.5, 0.0)


@pytest.mark.parametrize("field, value, message", [
    ("max_drop_vs_dense_db", -0.1, "validate.max_drop_vs_dense_db must be >= 0, not -0.1"),
    ("max_drop_vs_dense_db", 1000, "validate.max_drop_vs_dense_db must be <= 100, not 1000"),
    ("max_drop_vs_dense_db", "0.5", "validate.max_drop_vs_dense_db must be a finite number, not '0.5'"),
    ("max_drop_vs_dense_db", True, "validate.max_drop_vs_dense_db must be a finite number, not True"),
    ("min_gain_vs_baseline_db", float("nan"), "validate.min_gain_vs_baseline_db must be a finite number, not nan"),
    ("min_gain_vs_baseline_db", -101, "validate.min_gain_vs_baseline_db must be >= -100, not -101"),
])
def test_bad_gate_limits_are_one_line(tmp_path, field, value, message):
    with pytest.raises(RecipeError) as exc:
        load_recipe(_edsr_with(tmp_path, **{field: value}))
    assert str(exc.value) == message


# --- a model below bicubic fails validate, in one line naming the figures; the reports show the gate ---------

@pytest.fixture(scope="module")
def below_bicubic(tmp_path_factory, tiny_images):
    """A tiny random-weight (far below bicubic) one-shot build with the gate on, FP32 and FP16 graphs."""
    folder = tmp_path_factory.mktemp("below")
    recipe = write_tiny_recipe(folder, tiny_images, validate=GATE_ON)
    weights = write_tiny_weights(recipe, folder / "w.safetensors")
    out = folder / "b"
    from sls_deploy.cli import main

    code = main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.9", "--method",
                 "oneshot", "--n", "2", "--steps", "0", "--precision", "fp16", "--out", str(out), "--no-progress"])
    return code, out


def test_a_model_below_bicubic_fails_validate_naming_the_figures(below_bicubic, capsys):
    code, out = below_bicubic
    assert code == 1
    rep = json.loads((out / "report.json").read_text())
    p, gate = rep["psnr"], rep["quality_gate"]
    assert p["pruned"] < p["bicubic"] and not gate["passed"]
    assert [r["name"] for r in gate["rows"]] == ["pruned", "fp32 graph", "fp16 graph"]
    assert (gate["baseline"], gate["baseline_db"], gate["dense_db"]) == ("bicubic", p["bicubic"], p["dense"])
    below = f"{p['bicubic'] - p['pruned']:.2f} dB below bicubic {p['bicubic']:.2f} dB"
    assert below in gate["failure"] and gate["failure"].startswith(f"quality gate: pruned {p['pruned']:.2f} dB is ")
    # validate again (current: nothing rewritten) says the same in one line, exit 1, and the summary shows it
    before = {f: (out / f).read_bytes() for f in ("report.json", "report.md", "report.html", "manifest.json")}
    code, stdout, err = run_cli(capsys, "validate", out, "--no-progress")
    assert code == 1 and error_line(err) == f"error: {gate['failure']}"
    assert {f: (out / f).read_bytes() for f in before} == before
    assert "verdict" in stdout and "FAIL: quality gate" in stdout and f"FAIL: pruned {p['pruned']:.2f} dB" in stdout
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Quality gate" in md and "Verdict: **FAIL**" in md
    assert f"| pruned | {p['pruned']:.2f} | {p['dense'] - p['pruned']:.2f} | 0.50 |" in md
    assert "<h2>Quality gate</h2>" in html and "short of the bicubic limit</td>" in html


def test_validate_backend_torch_applies_the_same_gate(below_bicubic, tmp_path, capsys):
    _, out = below_bicubic
    copy = tmp_path / "b"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("work"))
    code, _, err = run_cli(capsys, "validate", copy, "--backend", "torch", "--no-latency", "--no-progress")
    rep = json.loads((copy / "report.json").read_text())
    assert code == 1 and rep["backend"] == "torch" and [r["name"] for r in rep["quality_gate"]["rows"]] == ["pruned"]
    assert error_line(err) == f"error: {rep['quality_gate']['failure']}"


def test_validate_backend_trt_repeats_the_recorded_gate(below_bicubic, tmp_path):
    """The device has no PyTorch weights (a pack): the engine's own checks pass, the recorded gate fails it."""
    from sls_deploy.backends.runtime import onnx_runner
    from sls_deploy.stages.validate_engine import validate_engine

    _, out = below_bicubic
    root = tmp_path / "dev"
    shutil.copytree(out, root, ignore=shutil.ignore_patterns("work"))
    (root / "engine").mkdir()
    (root / "engine" / "model.plan").write_bytes(b"stand-in")
    recipe = load_recipe(root / "recipe.yaml")
    res = validate_engine(root, recipe, "fp32", None, runs=1, open_engine=lambda p: onnx_runner(root / "model.onnx"))
    gate = json.loads((root / "report.json").read_text())["quality_gate"]
    assert all(r["passed"] for r in res["shapes"]) and not res["passed"]
    assert res["verdict"] == gate["failure"] and res["quality_gate"] == gate
    (root / "report.json").unlink()
    res = validate_engine(root, recipe, "fp32", None, runs=1, open_engine=lambda p: onnx_runner(root / "model.onnx"))
    assert res["passed"] and res["verdict"].endswith("; quality gate not measured (no readable report.json: "
                                                     "validate the bundle before packing it)")


def test_a_video_model_below_bicubic_fails_validate(tmp_path, capsys):
    from test_video_pipeline import frames, write_clip, write_recipe

    clips = {"train": tmp_path / "clips" / "train", "eval": tmp_path / "clips" / "eval"}
    write_clip(clips["train"] / "a", frames(5, 32, 32, 1))
    write_clip(clips["eval"] / "e", frames(4, 32, 40, 3))
    recipe = write_recipe(tmp_path / "r", "basicvsr", clips, validate={"latency_warmup": 0, "latency_runs": 1})
    weights = tmp_path / "w.safetensors"
    write_tiny_weights(recipe, weights)
    code, stdout, err = run_cli(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", "0.7",
                                "--method", "l1", "--steps", "1", "--precision", "fp32", "--out", tmp_path / "b",
                                "--no-progress")
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    gate, p = rep["quality_gate"], rep["psnr"]
    assert code == 1 and p["pruned"] < p["bicubic"] and not rep["checks"]["quality_gate"]
    assert [r["name"] for r in gate["rows"]] == ["pruned", "fp32 graph"]
    assert error_line(err) == f"error: {gate['failure']}" and "FAIL: quality_gate" in stdout
    assert "## Quality gate" in (tmp_path / "b" / "report.md").read_text()


# --- a good model passes; a pruned one too far below dense fails (the shipped EDSR weights, tiny images) -----

def _real_recipe(folder: Path, images, **validate) -> Path:
    """The shipped EDSR-baseline weights with tiny sizes (fast shape checks and latency): a model that beats
    bicubic, which a tiny test model with random weights cannot."""
    raw = yaml.safe_load(recipe_for_model("edsr").read_text())
    raw.update(reference_output=[128, 96], sparsity={"method": "oneshot", "m": 4, "target": "none"},
               data={"train": str(images["train"]), "eval": str(images["eval"]), "metric_channel": "y"},
               finetune=TINY_RECIPE["finetune"], engine={"min": [1, 8, 8], "opt": [1, 8, 8], "max": [1, 8, 8]},
               precision=dict(raw["precision"], graphs=["fp32"]),  # one shape (8x8) checked: the gate is the point
               validate={**TINY_RECIPE["validate"], "sizes": [[8, 8]], "odd_size": [8, 8], "latency_runs": 1})
    del raw["validate"]["max_drop_vs_dense_db"], raw["validate"]["min_gain_vs_baseline_db"]
    raw["validate"].update(validate)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_good_pruned_model_passes(tmp_path, tiny_images, capsys):
    recipe = _real_recipe(tmp_path, tiny_images)  # the shipped limits: 0.5 dB below dense, above bicubic
    code, stdout, err = run_cli(capsys, "build", "--recipe", recipe, "--budget", "0.9", "--method", "oneshot",
                                "--n", "3", "--steps", "0", "--out", tmp_path / "b", "--no-progress")
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    p, gate = rep["psnr"], rep["quality_gate"]
    assert code == 0, err
    assert p["bicubic"] < p["pruned"] < p["dense"] and p["dense"] - p["pruned"] < 0.5  # 3:4 one-shot: pruned
    assert gate["passed"] and [r["passed"] for r in gate["rows"]] == [True, True]
    assert "pass (at most 0.5 dB below dense, at least 0 dB above bicubic)" in stdout
    assert "quality gate)" in stdout and "Verdict: **pass**" in (tmp_path / "b" / "report.md").read_text()


def test_a_pruned_model_too_far_below_dense_fails(tmp_path, tiny_images, capsys):
    """2:4 one-shot without finetuning; only the dense limit enforced, so the line names that figure alone."""
    recipe = _real_recipe(tmp_path, tiny_images, min_gain_vs_baseline_db=None)
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--budget", "0.9", "--method", "oneshot", "--n",
                           "2", "--steps", "0", "--out", out, "--no-progress")
    assert code == 0, err
    assert run_cli(capsys, "finetune", out, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "validate", out, "--backend", "torch", "--no-latency", "--no-progress")
    p = json.loads((out / "report.json").read_text())["psnr"]
    assert code == 1 and p["dense"] - p["pruned"] > 0.5
    assert error_line(err) == (f"error: quality gate: pruned {p['pruned']:.2f} dB is {p['dense'] - p['pruned']:.2f} "
                               f"dB below dense {p['dense']:.2f} dB (limit 0.5 dB)")


# --- --steps: the search never takes the last quarter -------------------------------------------------------

def test_short_steps_shrink_the_search_and_say_so(tmp_path, tiny_images, capsys):
    recipe = write_tiny_recipe(tmp_path, tiny_images, structured={"round_to": 2, "ssl_steps": 500})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", "0.6", "--method",
                           "ssl", "--steps", "20", "--precision", "fp32", "--out", out, "--no-progress")
    assert code == 0, err
    assert ("  --steps 20 is short: ssl's search phase takes 15 steps instead of 500 (structured.ssl_steps), so that "
            "finetuning gets at least 5 (a quarter of --steps)") in err.splitlines()
    assert json.loads((out / "plan.json").read_text())["search"]["ssl_steps"] == 15
    assert json.loads((out / "manifest.json").read_text())["stages"]["finetune"]["result"]["steps"] == 5


def test_sls_search_is_capped_at_three_quarters(tmp_path, tiny_images, capsys, monkeypatch):
    from sls_deploy.pruning.nm import strategy as search_stage

    caps = []
    real = search_stage.search_sls
    monkeypatch.setattr(search_stage, "search_sls", lambda *a, **kw: caps.append(kw["max_steps"]) or real(*a, **kw))
    recipe = write_tiny_recipe(tmp_path, tiny_images, sls={**TINY_RECIPE["sls"], "max_search_steps": 150})
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "search", "--recipe", recipe, "--weights", weights, "--budget", "0.6",
                           "--method", "sls", "--steps", "8", "--out", out, "--no-progress")
    assert code == 0, err
    assert ("  --steps 8 is short: the SLS search may take at most 6 steps instead of 150 (sls.max_search_steps), "
            "so that finetuning gets at least 2 (a quarter of --steps)") in err.splitlines()
    assert caps == [6] and json.loads((out / "plan.json").read_text())["search"]["steps"] <= 6


@pytest.mark.parametrize("steps", ["0", "1"])
def test_ssl_needs_two_steps(tmp_path, tiny_recipe, tiny_weights, capsys, steps):
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--weights", tiny_weights, "--budget", "0.6",
                           "--method", "ssl", "--steps", steps, "--out", tmp_path / "b")
    assert code == 2 and error_line(err) == (
        "error: --method ssl learns its channel scales by training, then finetunes the narrower model: give "
        f"--steps >= 2, not {steps}")
    assert not (tmp_path / "b").exists()


# --- finetune makes export and validate stale ----------------------------------------------------------------

@pytest.fixture
def finished(tmp_path, tiny_images):
    from conftest import build_tiny_2to4_bundle

    return build_tiny_2to4_bundle(tmp_path, tiny_images)


def test_finetune_invalidates_export_and_validate(finished, capsys):
    b = finished
    m = json.loads((b / "manifest.json").read_text())
    assert {"export", "validate"} <= set(m["stages"]) and "invalidated" not in m
    code, out, _ = run_cli(capsys, "finetune", b, "--steps", "1", "--no-progress")
    assert code == 0
    assert out.splitlines()[-1] == (f"export and validate no longer current (new weights): next `sls-deploy export {b}` "
                                    f"and `sls-deploy validate {b}`, or the build again")
    m = json.loads((b / "manifest.json").read_text())
    assert set(m["stages"]) == {"search", "finetune"} and m["invalidated"] == {"export": "finetune",
                                                                                "validate": "finetune"}
    assert "model.onnx" not in m["files"] and "model.safetensors" in m["files"]
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "validate", b, "--no-progress")
    assert code == 1 and error_line(err) == (
        f"error: bundle {b}: export is no longer current (finetune ran after it and wrote new files); run "
        f"`sls-deploy export {b}` (or the build again) before validate")
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    assert run_cli(capsys, "export", b)[0] == 0
    m = json.loads((b / "manifest.json").read_text())
    assert m["invalidated"] == {"validate": "finetune"} and "export" in m["stages"]
    code, _, err = run_cli(capsys, "validate", b, "--no-latency", "--no-progress")
    assert code == 0, err  # the graphs match the new weights again
    assert "invalidated" not in json.loads((b / "manifest.json").read_text())


def test_build_reruns_what_finetune_made_stale(finished, capsys):
    b = finished
    assert run_cli(capsys, "finetune", b, "--steps", "0", "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "build", "--recipe", b.parent / "tiny.yaml", "--weights", b.parent / "w.safetensors",
                           "--budget", "0.9", "--method", "oneshot", "--n", "2", "--out", b, "--no-progress")
    assert code == 0, err
    logs = err.splitlines()
    # search is current; finetune runs again (build's --steps differs from the last finetune's), export, validate too
    assert logs[logs.index("[1/4] search ...") + 1] == "  up to date"
    assert "  up to date" not in logs[logs.index("[3/4] export ..."):]
    assert {"export", "validate"} <= set(json.loads((b / "manifest.json").read_text())["stages"])
