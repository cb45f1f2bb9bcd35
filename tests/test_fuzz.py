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


# --- issue 23: upscale outputs and media ---


def _snapshot(folder):
    """Every entry under ``folder`` (links not followed): its kind and, for a regular file, its bytes."""
    import os
    import stat

    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
            elif stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(p, folder)] = ("link", os.readlink(p))
            else:
                out[os.path.relpath(p, folder)] = (stat.S_IFMT(st.st_mode), st.st_ino)
    return out


def _png_header(width, height):
    """A PNG of ``width`` x ``height`` pixels as far as its header says (a few bytes, never decoded here)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def _video(path, fps, size, frames=3):
    import imageio.v2 as iio2
    import numpy as np

    with iio2.get_writer(str(path), "ffmpeg", fps=fps, codec="libx264", macro_block_size=1,
                         ffmpeg_log_level="error") as w:
        for i in range(frames):
            w.append_data(np.full(size[::-1] + (3,), 40 * i, np.uint8))


def _media_cases(tmp, bundle):
    """(arguments after `upscale BUNDLE`, fragment of the one error line) for every refused upscale."""
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp / "photo.png")
    (tmp / "X").mkdir()
    (tmp / "X" / "photo.png").write_bytes((tmp / "photo.png").read_bytes())
    (tmp / "Y").mkdir()
    (tmp / "Y" / "photo.png").write_text("my notes, not a picture")  # unrelated file of the output's name
    (tmp / "report_crop.png").write_bytes((tmp / "photo.png").read_bytes())
    Image.new("RGB", (1, 1)).save(tmp / "one_px.png")
    Image.new("RGB", (7, 3)).save(tmp / "small.png")
    (tmp / "huge.png").write_bytes(_png_header(20000, 20000))
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp / "anim.png", format="GIF", save_all=True, append_images=frames[1:])  # a GIF named .png
    frames[0].save(tmp / "apng.png", format="PNG", save_all=True, append_images=frames[1:])
    frames[0].save(tmp / "pages.tif", format="TIFF", save_all=True, append_images=frames[1:])
    _video(tmp / "tiny.mp4", 12, (2, 2))
    _video(tmp / "fast.mp4", 1000, (16, 16))
    for d in ("F", "L", "M", "K"):
        (tmp / d).mkdir()
    os.mkfifo(tmp / "F" / "photo.png")  # a fifo where the output would go
    os.symlink("/dev/null", tmp / "L" / "photo.png")  # a link to a device
    os.mkfifo(tmp / "M" / ".sls-upscale.json")  # upscale's record of its outputs, replaced by a fifo
    os.symlink(bundle / "recipe.yaml", tmp / "K" / "photo.png")  # a link into the bundle
    os.mkfifo(tmp / "fifo_out")
    os.mkfifo(tmp / "input_fifo.png")
    p, b = str(tmp / "photo.png"), str(bundle)
    return [
        ([str(tmp / "X" / "photo.png"), "-o", str(tmp / "X")], "would overwrite the input", 2),
        ([str(tmp / "X" / "photo.png"), "-o", str(tmp / "X"), "--force"], "would overwrite the input", 2),
        ([p, "-o", str(tmp / "Y")], "pass --force to replace it", 1),
        ([str(tmp / "report_crop.png"), "-o", b], "is a bundle: upscale never writes into a bundle", 2),
        ([str(tmp / "report_crop.png"), "-o", b, "--force"], "upscale never writes into a bundle", 2),
        ([p, "-o", str(bundle / "work" / "new"), "--force"], f"is inside the bundle {bundle}", 2),
        ([p, "-o", str(tmp / "K"), "--force"], "is a link into the bundle", 2),
        ([p, str(tmp / "one_px.png"), "-o", str(tmp / "o1")], "the image is 1 px wide x 1 px tall", 1),
        ([p, "-o", "/proc/self/x"], "cannot create output folder /proc/self/x", 1),
        ([str(tmp / "small.png"), "-o", str(tmp / "o2")], "small.png: the image is 7 px wide x 3 px tall", 1),
        ([str(tmp / "huge.png"), "-o", str(tmp / "o3")], "huge.png is 20000x20000 (381.5 MP), above the limit", 1),
        ([str(tmp / "tiny.mp4"), "-o", str(tmp / "o4")], "a video whose frames are 2 px wide x 2 px tall", 1),
        ([str(tmp / "fast.mp4"), "-o", str(tmp / "o5")], "frame rate of 1000 fps, outside the supported range", 1),
        ([p, str(tmp / "anim.png"), "-o", str(tmp / "o6")], "anim.png holds 3 frames", 1),
        ([str(tmp / "apng.png"), "-o", str(tmp / "o7")], "apng.png holds 3 frames", 1),
        ([str(tmp / "pages.tif"), "-o", str(tmp / "o8")], "pages.tif holds 3 frames", 1),
        ([p, "-o", str(tmp / "F"), "--force"], "exists and is a fifo: upscale never replaces one", 1),
        ([p, "-o", str(tmp / "L"), "--force"], "(a link) exists and is a device", 1),
        ([p, "-o", str(tmp / "M"), "--force"], ".sls-upscale.json is not a regular file", 1),
        ([p, "-o", str(tmp / "fifo_out")], "fifo_out is a fifo; give a folder", 2),
        ([str(tmp / "input_fifo.png"), "-o", str(tmp / "o9")], "input_fifo.png is not a regular file", 1),
    ]


def test_upscale_refuses_in_one_line_and_touches_nothing(tmp_path, capsys, built):
    import os

    cases = _media_cases(tmp_path, built)
    bundle_before, devnull = _snapshot(built), os.stat("/dev/null")
    for args, fragment, rc in cases:
        before = _snapshot(tmp_path)
        code, _, err = run_cli(capsys, "upscale", built, *args, "--no-progress")
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == rc and len(lines) == 1 and lines[0].startswith("error: "), (args, code, err)
        assert fragment in lines[0] and "Traceback" not in err, (args, err)
        assert _snapshot(tmp_path) == before, (args, "created, changed or removed something")
        assert _snapshot(built) == bundle_before, args
    assert not os.path.lexists("/proc/self/x")
    now = os.stat("/dev/null")
    assert (now.st_mode, now.st_rdev, now.st_ino) == (devnull.st_mode, devnull.st_rdev, devnull.st_ino)
    assert os.readlink(tmp_path / "L" / "photo.png") == "/dev/null"
    assert len(cases) == 21


def test_upscale_applies_and_reports_the_exif_orientation(tmp_path, capsys, built):
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image

    stored = Image.fromarray((np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6  # stored 24 wide x 20 tall; shown rotated 90 degrees clockwise: 20 wide x 24 tall
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:  # the decoded JPEG pixels, turned as a viewer shows them
        Image.fromarray(np.rot90(np.asarray(im), -1)).save(tmp_path / "upright.png")
    code, _, err = run_cli(capsys, "upscale", built, tmp_path / "phone.jpg", tmp_path / "upright.png", "-o",
                           tmp_path / "o", "--no-progress")
    assert code == 0, err
    assert f"{tmp_path / 'phone.jpg'}: rotated per its EXIF orientation (6: rotated 90 degrees clockwise)" in err
    phone, upright = iio.imread(tmp_path / "o" / "phone.png"), iio.imread(tmp_path / "o" / "upright.png")
    assert phone.shape == (96, 80, 3) and np.array_equal(phone, upright)


def test_upscale_force_replaces_an_unrelated_file_and_a_rerun_replaces_only_its_own(tmp_path, capsys, built):
    import imageio.v3 as iio
    from PIL import Image

    Image.new("RGB", (12, 10), "red").save(tmp_path / "a.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.png").write_text("mine")
    code, _, err = run_cli(capsys, "upscale", built, tmp_path / "a.png", "-o", out, "--force", "--no-progress")
    assert code == 0, err and iio.imread(out / "a.png").shape == (40, 48, 3)
    first = (out / "a.png").read_bytes()
    # the same command again: a.png is upscale's own output, unchanged since, so it is replaced without --force
    code, _, err = run_cli(capsys, "upscale", built, tmp_path / "a.png", "-o", out, "--no-progress")
    assert code == 0 and "replaced: its own earlier output, unchanged" in err, err
    assert (out / "a.png").read_bytes() == first
    # once the user changed it, it is theirs: refused without --force, and kept byte for byte
    (out / "a.png").write_bytes(first + b"edited")
    code, _, err = run_cli(capsys, "upscale", built, tmp_path / "a.png", "-o", out, "--no-progress")
    assert code == 1 and "is not an unchanged output of an earlier upscale" in err and "Traceback" not in err
    assert (out / "a.png").read_bytes() == first + b"edited"
