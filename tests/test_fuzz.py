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


# --- issue 24: data at scale ---


def _image_bytes(draw_bytes: bytes, keep: int) -> bytes:
    """A real PNG's first ``keep`` bytes followed by fuzz: a header that may read, pixels that may not."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[:keep] + draw_bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=64), keep=st.integers(0, 400), workers=st.sampled_from([0, 1]))
def test_any_broken_training_image_is_one_data_error_naming_it(tmp_path_factory, tail, keep, workers):
    from sls_deploy.data.patches import PatchSampler

    folder = tmp_path_factory.mktemp("fuzzimg")
    bad = folder / "fuzzed.png"
    bad.write_bytes(_image_bytes(tail, keep))
    try:
        lr, hr = PatchSampler([bad], 2, 4, 2, seed=0, workers=workers).batch()
    except SlsError as e:
        assert "\n" not in str(e) and "fuzzed.png" in str(e), str(e)
        return
    assert lr.shape == (2, 3, 4, 4) and hr.shape == (2, 3, 8, 8)  # enough of the PNG survived to read


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=WEIRD)
def test_any_data_workers_value_loads_or_is_one_typed_error(tmp_path_factory, value):
    raw = _set(EDSR, ("data", "workers"), value)
    path = tmp_path_factory.mktemp("rw") / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        r = load_recipe(path)
    except SlsError as e:
        assert "\n" not in str(e) and "data.workers" in str(e)
        return
    assert r.data_workers == "auto" or 0 <= r.data_workers <= 256
    assert r.digest() == load_recipe(recipe_for_model("edsr")).digest()  # workers are not part of a run's key


def test_prepare_data_and_training_refuse_bad_data_in_one_line(tmp_path, capsys, tiny_images):
    import numpy as np
    from PIL import Image

    from conftest import write_tiny_recipe

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(src / "ok.png")
    (tmp_path / "afile").write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((20, 90, 3), np.uint8)).save(small / "thin.png")
    headerless = tmp_path / "headerless"
    headerless.mkdir()
    (headerless / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated / "cut.png")
    raw = (truncated / "cut.png").read_bytes()
    (truncated / "cut.png").write_bytes(raw[: len(raw) // 2])
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    cache = tmp_path / "cache"
    assert run_cli(capsys, "prepare-data", src, cache, "--crop", "0", "--format", "memmap", "--no-progress")[0] == 0
    (cache / "images.u8").write_bytes(b"\x00" * 10)  # the cache's data cut short
    w = tmp_path / "w.safetensors"
    cases = [
        (["prepare-data", src, tmp_path / "o1", "--crop", "-1"], 2, "--crop"),
        (["prepare-data", src, tmp_path / "o2", "--step", "0"], 2, "--step"),
        (["prepare-data", src, tmp_path / "o3", "--workers", "many"], 2, "--workers"),
        (["prepare-data", src, tmp_path / "o4", "--format", "lmdb"], 2, "--format"),
        (["prepare-data", tmp_path / "nothere", tmp_path / "o5"], 1, "image folder not found"),
        (["prepare-data", src, tmp_path / "afile"], 2, "is a file"),
        (["prepare-data", src, tmp_path / "afile" / "sub"], 1, "is a file"),
        (["prepare-data", src, foreign], 1, "was not written by prepare-data"),
        (["prepare-data", src, src], 2, "must not contain one another"),
        (["prepare-data", headerless, tmp_path / "o6"], 1, "noise.png"),
        (["prepare-data", truncated, tmp_path / "o7"], 1, "cut.png"),
        (["train", "--recipe", recipe, "--data", small, "--out", w], 1, "thin.png"),
        (["train", "--recipe", recipe, "--data", headerless, "--out", w], 1, "noise.png"),
        (["train", "--recipe", recipe, "--data", truncated, "--out", w], 1, "cut.png"),
        (["train", "--recipe", recipe, "--data", cache, "--out", w], 1, "memmap cache"),
    ]
    for args, want, text in cases:
        before = _tree(tmp_path)
        code, _, err = run_cli(capsys, *args, "--no-progress")
        lines = [l for l in err.splitlines() if l.startswith("error: ")]
        assert code == want and len(lines) == 1 and text in lines[0] and "Traceback" not in err, (args, err)
        assert _tree(tmp_path) == before, (args, "changed files")
