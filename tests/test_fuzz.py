"""Fuzz-style checks: every command against a table of bad inputs, and recipe / plan fields by Hypothesis.

Each bad input must give exit code 1 or 2, one line on stderr, no traceback, and no file outside the run's own
folder created, changed or removed."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_cli
from sls_deploy.config.recipe import load_recipe, recipe_for_model
from sls_deploy.core.errors import SlsError

EDSR = yaml.safe_load(recipe_for_model("edsr").read_text())
WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=4),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = [("name",), ("base_weights",), ("reference_output",), ("modality",), ("model", "scale"),
          ("model", "num_feat"), ("model", "num_block"), ("model", "res_scale"), ("data", "metric_channel"),
          ("finetune", "steps"), ("finetune", "lr"), ("finetune", "batch_size"), ("finetune", "warmup"),
          ("train", "lr_patch"), ("sparsity", "m"), ("sparsity", "method"), ("export", "opset"),
          ("validate", "fp32_atol"), ("validate", "max_psnr_drop_db"), ("validate", "sizes"),
          ("validate", "odd_size"), ("validate", "latency_runs"), ("engine",), ("engine", "min"), ("engine", "opt"),
          ("engine", "workspace_mb"), ("precision", "graphs"), ("precision", "percentile"),
          ("precision", "fp32_islands"), ("structured", "round_to"), ("structured", "cap"), ("sls", "lam"),
          ("sls", "alpha"), ("sls", "max_search_steps"), ("srste", "decay")]


def _set(raw: dict, path: tuple, value) -> dict:
    raw = copy.deepcopy(raw)
    d = raw
    for k in path[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            return raw
    d[path[-1]] = value
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=WEIRD)
def test_any_recipe_field_value_loads_or_is_one_typed_error(tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(_set(EDSR, field, value)))
    try:
        load_recipe(path)
    except SlsError as e:
        assert "\n" not in str(e) and str(e)


PLAN = {"model": "m", "method": "oneshot", "budget": 0.5, "m": 4, "reference_output": [64, 64],
        "layers": [{"name": "a", "op": "conv", "weight_shape": [8, 8, 3, 3], "n": 2, "m": 4, "macs_dense": 10}],
        "dense_layers": [{"name": "b", "macs": 3, "reason": "r"}]}
PLAN_FIELDS = [("m",), ("budget",), ("layers",), ("reference_output",), ("dense_layers",), ("method",)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(PLAN_FIELDS + [("layers", 0, "n"), ("layers", 0, "m"), ("layers", 0, "weight_shape"),
                                             ("layers", 0, "macs_dense")]), value=WEIRD)
def test_any_plan_field_value_loads_or_is_one_typed_error(tmp_path_factory, field, value):
    from sls_deploy.pruning.registry import load_plan

    plan = copy.deepcopy(PLAN)
    target = plan
    for k in field[:-1]:
        target = target[k]
    target[field[-1]] = value
    path = tmp_path_factory.mktemp("p") / "plan.json"
    path.write_text(json.dumps(plan))
    try:
        load_plan(path)
    except SlsError as e:
        assert "\n" not in str(e) and str(e)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_images):
    from conftest import build_tiny_2to4_bundle

    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("built"), tiny_images)


def _cases(tmp, bundle):
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "junk.onnx").write_bytes(b"not onnx")
    (tmp / "notes.txt").write_text("mine")
    (tmp / "afile").write_text("x")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "bad.yaml").write_text("model: [1, 2\n")
    (tmp / "noarch.yaml").write_text("model: {scale: 4}\n")
    (tmp / "weights.pt").write_bytes(b"\x80\x04not a pickle")
    (tmp / "fake_bundle").mkdir()
    (tmp / "fake_bundle" / "manifest.json").write_text("[1, 2]")
    b = str(bundle)
    return [
        ["build", "--model", "edsr", "--budget", "0"],
        ["build", "--model", "edsr", "--budget", "1.5"],
        ["build", "--model", "edsr", "--budget", "nan"],
        ["build", "--model", "nosuch", "--budget", "0.4"],
        ["build", "--model", "edsr", "--recipe", str(tmp / "bad.yaml"), "--budget", "0.4"],
        ["build", "--recipe", str(tmp / "bad.yaml"), "--budget", "0.4"],
        ["build", "--recipe", str(tmp / "noarch.yaml"), "--budget", "0.4"],
        ["build", "--recipe", str(tmp / "missing.yaml"), "--budget", "0.4"],
        ["build", "--model", "edsr", "--budget", "0.4", "--weights", str(tmp / "weights.pt"),
         "--out", str(tmp / "o1")],
        ["build", "--model", "edsr", "--budget", "0.4", "--weights", str(tmp / "nope.safetensors"),
         "--out", str(tmp / "o2")],
        ["build", "--model", "edsr", "--budget", "0.4", "--out", str(tmp / "afile" / "sub")],
        ["build", "--model", "edsr", "--budget", "0.4", "--method", "l1", "--m", "4", "--out", str(tmp / "o3")],
        ["build", "--model", "edsr", "--budget", "0.4", "--temporal-weight", "1", "--out", str(tmp / "o4")],
        ["build", "--model", "edsr", "--budget", "0.4", "--seed", "-1"],
        ["build", "--model", "edsr", "--budget", "0.4", "--n", "9", "--method", "oneshot", "--out", str(tmp / "o5")],
        ["build", "--model", "edsr", "--budget", "0.4", "--data", str(tmp / "nodata"), "--out", str(tmp / "o6")],
        ["search", "--model", "edsr", "--budget", "0.4", "--out", str(tmp / "fake_bundle")],
        ["finetune", str(tmp / "nobundle")],
        ["finetune", str(tmp / "fake_bundle")],
        ["export", str(tmp / "nobundle")],
        ["export", b, "--precision", "fp64"],
        ["validate", b, "--backend", "tensorflow"],
        ["validate", b, "--eval-data", str(tmp / "nodata")],
        ["validate", b, "--latency-runs", "0"],
        ["engine", b, "--precision", "fp64"],
        ["engine", str(tmp / "nobundle.tar.gz"), "--dry-run"],
        ["engine", str(tmp / "junk.onnx"), "--dry-run"],
        ["pack", b, "--out", str(tmp / "notes.txt")],
        ["pack", b, "--out", str(tmp)],
        ["pack", str(tmp / "nobundle")],
        ["inspect", str(tmp / "empty.onnx")],
        ["inspect", str(tmp / "junk.onnx")],
        ["inspect", str(tmp / "missing.onnx")],
        ["inspect", b, "--size", "12xx"],
        ["import-sls", str(tmp / "weights.pt"), "--model", "edsr", "--out", str(tmp / "o7")],
        ["import-sls", str(tmp / "missing.safetensors"), "--model", "edsr", "--out", str(tmp / "o8")],
        ["train", "--model", "edsr", "--out", str(tmp / "notes.txt"), "--steps", "1"],
        ["train", "--model", "edsr", "--steps", "0"],
        ["nosuchcommand"],
    ]


def test_every_command_refuses_bad_input_in_one_line_and_loses_nothing(tmp_path, capsys, built, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) land here, never in the repository
    bundle_before = _tree(built)
    cases = _cases(tmp_path, built)
    for args in cases:
        before = _tree(tmp_path)
        code, out, err = run_cli(capsys, *args)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code in (1, 2), (args, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert "Traceback" not in err, args
        after = _tree(tmp_path)
        assert {k: v for k, v in after.items() if k in before} == before, (args, "changed or removed a file")
        assert not set(after) - set(before), (args, "created", sorted(set(after) - set(before)))
        assert _tree(built) == bundle_before, args
    assert len(cases) >= 35


def test_too_small_eval_image_and_bad_base_weights_are_one_line(tmp_path, capsys, built):
    from PIL import Image

    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (7, 5)).save(small / "tiny.png")
    code, _, err = run_cli(capsys, "validate", str(built), "--eval-data", str(small), "--no-latency")
    assert code == 1 and "eval image tiny.png is 7x5; evaluation needs at least" in err.strip().splitlines()[-1]
    raw = dict(yaml.safe_load(recipe_for_model("edsr").read_text()), base_weights=[1])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SlsError, match="base_weights must be a file name or path, not \\[1\\]"):
        load_recipe(tmp_path / "r.yaml")


# --- issue 23: quality gates ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([("validate", "max_drop_vs_dense_db"), ("validate", "min_gain_vs_baseline_db")]),
       value=WEIRD)
def test_any_quality_gate_limit_loads_or_is_one_typed_error(tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(_set(EDSR, field, value)))
    try:
        v = load_recipe(path).validate
    except SlsError as e:
        assert "\n" not in str(e) and str(e).startswith(f"validate.{field[1]} must be ")
    else:
        limit = getattr(v, field[1])
        assert limit is None if value is None else limit == float(value)


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_images):
    """Two tiny bundles with the quality gate on: a one-shot one whose random weights fail it (build exit 1), and
    an ssl one (its search took 3 of its steps) finetuned again after export (export and validate stale)."""
    from conftest import TINY_RECIPE, write_tiny_recipe, write_tiny_weights

    folder = tmp_path_factory.mktemp("gated")
    recipe = write_tiny_recipe(folder, tiny_images, validate={**TINY_RECIPE["validate"], "max_drop_vs_dense_db": 0.5,
                                                              "min_gain_vs_baseline_db": 0.0})
    weights = write_tiny_weights(recipe, folder / "w.safetensors")
    common = ["--recipe", recipe, "--weights", weights, "--precision", "fp32", "--no-progress"]
    from sls_deploy.cli import main

    assert main([str(a) for a in ["build", *common, "--budget", "0.9", "--method", "oneshot", "--n", "2",
                                  "--steps", "0", "--out", folder / "failing"]]) == 1
    assert main([str(a) for a in ["build", *common, "--budget", "0.6", "--method", "ssl", "--steps", "4",
                                  "--out", folder / "ssl"]]) == 1  # random weights: fails the gate, all stages ran
    assert json.loads((folder / "ssl" / "plan.json").read_text())["search"]["ssl_steps"] == 3
    assert main([str(a) for a in ["finetune", folder / "ssl", "--steps", "5", "--no-progress"]]) == 0  # stale now
    return {"recipe": recipe, "weights": weights, "failing": folder / "failing", "ssl": folder / "ssl"}


def _gate_cases(tmp, g):
    raw = yaml.safe_load(g["recipe"].read_text())
    for name, value in (("neg", -1), ("text", "half a dB"), ("huge", 1e9), ("list", [0.5])):
        bad = copy.deepcopy(raw)
        bad["validate"]["max_drop_vs_dense_db"] = value
        (tmp / f"gate_{name}.yaml").write_text(yaml.safe_dump(bad))
    bad = copy.deepcopy(raw)
    bad["validate"]["min_gain_vs_baseline_db"] = float("inf")
    (tmp / "gain_inf.yaml").write_text(yaml.safe_dump(bad))
    w = str(g["weights"])
    return [
        *[["build", "--recipe", str(tmp / f"gate_{n}.yaml"), "--weights", w, "--budget", "0.5", "--out",
           str(tmp / f"o_{n}")] for n in ("neg", "text", "huge", "list")],
        ["build", "--recipe", str(tmp / "gain_inf.yaml"), "--weights", w, "--budget", "0.5", "--out", str(tmp / "o9")],
        ["build", "--recipe", str(g["recipe"]), "--weights", w, "--budget", "0.6", "--method", "ssl", "--steps", "1",
         "--out", str(tmp / "o10")],
        ["build", "--recipe", str(g["recipe"]), "--weights", w, "--budget", "0.6", "--method", "hybrid", "--steps",
         "1", "--out", str(tmp / "o11")],
        ["finetune", str(g["ssl"]), "--steps", "3"],  # the search took 3: finetuning would get 0
        ["validate", str(g["ssl"]), "--no-progress"],  # finetuned after export: asks for export
        ["validate", str(g["ssl"]), "--backend", "torch", "--no-latency", "--no-progress"],  # no graphs needed
        ["validate", str(g["failing"]), "--no-progress"],  # current: the recorded gate failure again
        ["validate", str(g["failing"]), "--backend", "torch", "--no-latency", "--no-progress"],
    ]


def test_quality_gate_cases_are_one_line_and_lose_nothing(tmp_path, capsys, gated, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _gate_cases(tmp_path, gated)
    expect = {0: "validate.max_drop_vs_dense_db must be >= 0", 2: "validate.max_drop_vs_dense_db must be <= 100",
              4: "validate.min_gain_vs_baseline_db must be a finite number", 5: "--steps >= 2, not 1",
              6: "--steps >= 2, not 1", 7: "finetuning would run 0 steps; give --steps 4",
              8: "export is no longer current (finetune ran after it", 9: "quality gate: pruned ",
              10: "quality gate: pruned ", 11: "quality gate: pruned "}
    for i, args in enumerate(cases):
        before, bundles = _tree(tmp_path), {k: _tree(gated[k]) for k in ("failing", "ssl")}
        code, out, err = run_cli(capsys, *args)
        errors = [l for l in err.splitlines() if l.startswith("error: ")]
        others = [l for l in err.splitlines() if l.strip() and not l.startswith("error: ")]
        assert code in (1, 2) and len(errors) == 1 and "Traceback" not in err, (args, code, err)
        assert all(l.startswith(("  ", "[")) for l in others), (args, others)  # progress lines only
        assert expect.get(i, "") in errors[0], (args, errors[0])
        assert _tree(tmp_path) == before, (args, "created, changed or removed a file")
        rewritten = {9: "ssl", 11: "failing"}.get(i)  # validate on another backend writes that backend's report
        assert {k: _tree(gated[k]) for k in bundles if k != rewritten} == \
            {k: v for k, v in bundles.items() if k != rewritten}, args
    assert cases[7][0] == "finetune" and len(cases) == 12
