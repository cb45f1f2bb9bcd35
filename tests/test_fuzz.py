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
    assert code == 1 and "eval image tiny.png is 7 px wide x 5 px tall; evaluation needs at least" in err.strip().splitlines()[-1]
    raw = dict(yaml.safe_load(recipe_for_model("edsr").read_text()), base_weights=[1])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SlsError, match="base_weights must be a file name or path, not \\[1\\]"):
        load_recipe(tmp_path / "r.yaml")


# --- issue 23: bounded parsing, disk, files ---------------------------------------------------------------------
# Each case: exit 1 or 2, one line on stderr, no traceback, nothing created, changed or removed. Cases that used to
# hang (an alias bomb: over 150 s) run in a child process with a generous cap, so that a regression fails instead of
# stalling the suite; the cap is not a speed measurement (a refusal takes milliseconds, the child's imports most of
# the cap on a loaded machine).

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import sls_deploy  # noqa: E402

CHILD_CAP_S = 100  # all cases of a child: ~25 s on a loaded 2-core machine; the alias bomb alone ran > 150 s before
_SRC = str(Path(sls_deploy.__file__).resolve().parents[1])  # the sls_deploy being tested (checkout or installed)
_BATCH = r"""
import contextlib, io, json, sys, traceback
from sls_deploy.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:
            code, _ = -1, err.write(traceback.format_exc())
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")])}


def _run_batch(cases: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """``sls-deploy ARGS`` for every case in one child process (imports paid once), at most CHILD_CAP_S."""
    proc = subprocess.run([sys.executable, "-c", _BATCH, json.dumps(cases)], cwd=cwd, env=_child_env(),
                          capture_output=True, text=True, timeout=CHILD_CAP_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


def _one_error_line(args, code: int, err: str, progress: bool = False) -> str:
    """The error line; with ``progress``, stage progress lines may come before it (a build reports each stage)."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert code in (1, 2), (args, code, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])
    if progress:
        lines = [l for l in lines if not l.startswith(("[", "  "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err[-2000:])
    return lines[0]


def _artifacts(folder: Path) -> dict:
    """A bundle's files byte for byte, less its lock file (it holds the pid of the last command that wrote)."""
    return {k: v for k, v in _tree(folder).items() if k != ".sls-deploy.lock"}


def _bomb(leaf: str, levels: int = 9) -> str:
    """A flow-style "billion laughs": ``levels`` nested anchors, each list 9 aliases of the previous one."""
    val = "[" + ", ".join([f"&a0 {leaf}"] + ["*a0"] * 8) + "]"
    for i in range(1, levels):
        val = "[" + ", ".join([f"&a{i} {val}"] + [f"*a{i}"] * 8) + "]"
    return val


def _stats(paths) -> dict:
    """What identifies a node (device numbers, type, inode): a replaced node differs."""
    return {str(p): (s.st_mode, s.st_rdev, s.st_ino) for p in paths for s in [os.lstat(p)]}


def _special_nodes(tmp: Path) -> list[Path]:
    """A fifo, a unix socket, a symlink to the fifo and (where this user may make one) a private /dev/null."""
    os.mkfifo(tmp / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp / "sock"))
    sock.close()
    (tmp / "link").symlink_to(tmp / "fifo")
    nodes = [tmp / "fifo", tmp / "sock", tmp / "link"]
    with contextlib.suppress(OSError):  # needs CAP_MKNOD (root); the fifo and socket cases run everywhere
        os.mknod(tmp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append(tmp / "null")
    return nodes


def test_hostile_recipes_and_options_are_refused_fast_in_one_line(tmp_path, built):
    edsr = recipe_for_model("edsr").read_text()
    assert "  sizes: [[32, 32], [45, 61]]" in edsr and "  fp32_islands: [conv_first, upsample.2, conv_last]" in edsr
    recipes = {
        "bomb_sizes": edsr.replace("  sizes: [[32, 32], [45, 61]]", "  sizes: " + _bomb("[1, 2]", 8)),
        "bomb_islands": edsr.replace("  fp32_islands: [conv_first, upsample.2, conv_last]",
                                     "  fp32_islands: " + _bomb("x")),
        "deep": "model: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "deep_block": "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v: 1\n",
        "dup": edsr + "\nfinetune:\n  steps: 5\n",
        "ref": edsr.replace("reference_output: [1280, 720]", "reference_output: [1000000000000000, 1000000000000000]"),
        "engine": edsr.replace("max: [1, 270, 480]", "max: [1, 270000000, 480]"),
    }
    for name, text in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    with open(tmp_path / "big.yaml", "w") as f:  # 200 MB (sparse: no disk is used)
        f.write(edsr)
        f.truncate(200 * 2**20)
    nodes = _special_nodes(tmp_path)
    out = tmp_path / "o"
    recipe_case = ["search", "--budget", "0.5", "--method", "oneshot", "--out", str(out), "--recipe"]
    expect = {
        "bomb_sizes": "aliases expand to more than 10000 nodes", "bomb_islands": "aliases expand to more than",
        "deep": "nesting depth", "deep_block": "nesting deeper than 32 levels", "big": "is larger than 1 MiB",
        "dup": "duplicate key 'finetune'", "ref": "reference_output width must be in 4..8192",
        "engine": "engine.max must be [N, H, W] with N at most 64 and H, W at most 8192",
    }
    cases = [(recipe_case + [str(tmp_path / f"{n}.yaml")], frag) for n, frag in expect.items()]
    big = "99999999999999999999"
    cases += [(["train", "--model", "edsr", "--steps", big, "--out", str(tmp_path / "t.safetensors")], "--steps"),
              (["build", "--model", "edsr", "--budget", "0.4", "--steps", big, "--out", str(out)], "--steps"),
              (["search", "--model", "edsr", "--budget", "0.4", "--steps", big, "--out", str(out)], "--steps"),
              (["finetune", str(built), "--steps", big], "--steps"),
              (["route", str(tmp_path / "fam"), "--steps", big], "--steps"),
              (["validate", str(built), "--latency-runs", big], "--latency-runs"),
              (["upscale", str(built), "x.png", "-o", str(out), "--overlap", big], "--overlap")]
    for node in nodes:  # never replaced, --force or not; a fifo never blocks the run
        cases += [(["train", "--model", "edsr", "--steps", "1", "--out", str(node), "--force"], "not a regular file"),
                  (["pack", str(built), "--out", str(node)], "not a regular file"),
                  (["pack", str(built), "--out", str(node), "--force"], "not a regular file"),
                  (["build", "--model", "edsr", "--budget", "0.4", "--out", str(node)], "is not a folder"),
                  (["search", "--model", "edsr", "--budget", "0.4", "--out", str(node)], "is not a folder")]
    before, node_stats, bundle_before = _tree(tmp_path), _stats(nodes), _tree(built)
    results = _run_batch([args for args, _ in cases], tmp_path)
    for (args, fragment), (code, err) in zip(cases, results):
        line = _one_error_line(args, code, err)
        assert fragment in line and len(line) < 400, (args, line[:500])
    assert _tree(tmp_path) == before and _stats(nodes) == node_stats and _tree(built) == bundle_before
    made = sorted([*(f"{n}.yaml" for n in expect), *(n.name for n in nodes)])
    assert sorted(p.name for p in tmp_path.iterdir()) == made


def test_yaml_loader_keeps_what_recipes_use_and_bounds_the_rest(tmp_path):
    from sls_deploy.core.errors import RecipeError
    from sls_deploy.core.safe_yaml import MAX_ALIAS_NODES, load_yaml

    def load(text):
        (tmp_path / "r.yaml").write_text(text)
        return load_yaml(tmp_path / "r.yaml", "recipe", RecipeError)

    # anchors, aliases and merge keys within the limits load as PyYAML loads them
    text = "base: &b {lr: 1.0e-3, steps: 4}\na: *b\nc: {<<: *b, steps: 5}\nl: [&x 1, *x, *x]\n"
    assert load(text) == yaml.safe_load(text) == {"base": {"lr": 1e-3, "steps": 4}, "a": {"lr": 1e-3, "steps": 4},
                                                  "c": {"lr": 1e-3, "steps": 5}, "l": [1, 1, 1]}
    nested = "x: " + "[" * 31 + "]" * 31 + "\n"  # 32 levels with the mapping: the limit, still read
    assert load(nested) == yaml.safe_load(nested)
    refused = {
        "a: &a [1, *a]\n": "an alias refers to a node that contains it",
        "a: [1, *nope]\n": "found undefined alias 'nope'",
        "a:\n  b: 1\n  b: 2\n": "duplicate key 'b' (the second one would silently replace the first) at line 3",
        "x: [" + ", ".join(["1"] * 20_000) + "]\n": "more than 10000 values",
        # 200 aliases of a 100-item list: 20,000 nodes from 2 KB
        "l: &l [" + ", ".join(["0"] * 99) + "]\nm: [" + ", ".join(["*l"] * 200) + "]\n":
            f"aliases expand to more than {MAX_ALIAS_NODES} nodes",
    }
    for bad, fragment in refused.items():
        with pytest.raises(RecipeError) as e:
            load(bad)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)[:300]


def test_recipe_errors_quote_a_short_prefix_of_a_large_value(tmp_path):
    raw = copy.deepcopy(EDSR)
    raw["validate"]["sizes"] = [[1, 2, 3]] * 2000  # 8000 values: within the loader's limits, not [H, W] pairs
    raw["precision"]["calib_method"] = "x" * 100_000
    for field in ("validate", "precision"):
        r = dict(EDSR, **{field: raw[field]})
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        with pytest.raises(SlsError) as e:
            load_recipe(tmp_path / "r.yaml")
        assert len(str(e.value)) < 300 and ("..." in str(e.value)), str(e.value)[:400]


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path):
    """/dev/full answers every write with ENOSPC: a real kernel error inside atomic_path, on any machine."""
    from sls_deploy.core.atomic import atomic_path
    from sls_deploy.core.errors import DiskFullError

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / "model.onnx").write_bytes(b"old")
    with pytest.raises(DiskFullError) as e:
        with atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"partial")
            with open("/dev/full", "wb") as full:
                full.write(b"x" * 4096)
                full.flush()
    assert str(e.value).startswith(f"no space left on {tmp_path}: model.onnx was not written")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and (tmp_path / "model.onnx").read_bytes() == b"old"


_DISK_FULL = r"""
import contextlib, hashlib, io, json, os, shutil, subprocess, sys, traceback
from pathlib import Path
from sls_deploy.cli import main

def tree(root):  # the lock file holds the pid of the last command: not an artifact
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name not in ("fill", ".sls-deploy.lock")}

results = []
for case in json.loads(sys.argv[1]):
    mnt = Path(case["mount"])
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    if case.get("copy"):
        shutil.copytree(case["copy"], mnt / "b")
        for name in case.get("drop", []):
            (mnt / "b" / name).unlink()
    st = os.statvfs(mnt)
    with open(mnt / "fill", "wb") as f:  # leave exactly case["slack"] bytes
        f.write(b"\0" * (st.f_bavail * st.f_frsize - case["slack"]))
    before = tree(mnt)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(case["argv"])
        except BaseException:
            code, _ = -1, err.write(traceback.format_exc())
    results.append({"code": code, "err": err.getvalue(), "before": before, "after": tree(mnt),
                    "temps": sorted(str(p) for p in mnt.rglob("*tmp*"))})
print(json.dumps(results))
"""


def _namespace_mounts() -> str | None:
    """None if a tmpfs can be mounted in a private mount namespace here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare(1) on this system"
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def test_full_disk_during_export_upscale_pack_train_and_build_is_one_line(tmp_path, built, tiny_images):
    """A real full disk: a 4 MiB tmpfs, filled to a few KB, in a private mount namespace (``unshare -rm``: nothing
    is mounted for anyone else and it vanishes with the child). The slack of each case lets small writes through
    and stops the stage's first large file: torch.onnx.export's graph, the PNG, the tar, torch.save's training
    checkpoint (a RuntimeError from torch's C++ writer, not an OSError)."""
    why = _namespace_mounts()
    if why:
        pytest.skip(why)
    mnt, src = tmp_path / "m", tmp_path / "src"
    shutil.copytree(built, src)  # this process holds the lock of `built` (it built it): the child may not take it
    recipe = built.parent / "tiny.yaml"
    weights = built.parent / "w.safetensors"
    photo = next(Path(tiny_images["eval"]).glob("*.png"))
    cases = [
        {"name": "export", "copy": str(src), "slack": 65536,
         "drop": ["model.onnx", "model.fp16.onnx", "model.int8.onnx", "work/dense.onnx"],
         "argv": ["export", str(mnt / "export" / "b")], "file": "fp32.onnx"},
        {"name": "upscale", "slack": 8192, "argv": ["upscale", str(src), str(photo), "-o", str(mnt / "upscale" / "o"),
                                                    "--no-progress"], "file": photo.name},
        {"name": "pack", "slack": 8192, "argv": ["pack", str(src), "--out", str(mnt / "pack" / "b.tar.gz")],
         "file": "b.tar.gz"},
        {"name": "train", "slack": 8192, "argv": ["train", "--recipe", str(recipe), "--out",
                                                  str(mnt / "train" / "t.safetensors"), "--no-progress"],
         "file": "t.safetensors.ckpt"},
        {"name": "build", "slack": 150_000, "argv": ["build", "--recipe", str(recipe), "--weights", str(weights),
                                                     "--budget", "0.9", "--method", "oneshot", "--n", "2", "--out",
                                                     str(mnt / "build" / "b"), "--no-progress"],
         "file": "finetune.ckpt"},
    ]
    for c in cases:
        c["mount"] = str(mnt / c["name"])
    bundle_before = _artifacts(src)
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _DISK_FULL, json.dumps(cases)], cwd=tmp_path,
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c, r in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        line = _one_error_line(c["name"], r["code"], r["err"], progress=c["name"] == "build")
        assert line.startswith("error: no space left on ") and f"{c['file']} was not written" in line, line
        assert r["temps"] == [], (c["name"], r["temps"])
        if c["name"] != "build":  # a build keeps its finished stages (plan, weights) to resume from
            assert r["after"] == r["before"], (c["name"], r["before"], r["after"])
    assert _artifacts(src) == bundle_before


_KILLED_WRITER = r"""
import os, signal, sys
from sls_deploy.core.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a graph")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_later_run_removes_the_temp_files_a_killed_writer_left(tmp_path, built, capsys):
    """SIGKILL mid-write leaves work/.fp32.onnx.<host>-<pid>.<random>.tmp; the next command that takes the bundle's
    lock removes it. Only that naming, only writers that are gone: a live pid's, another machine's or an old-style
    name younger than an hour, and any other file stay."""
    import time

    from sls_deploy.core import atomic

    b = tmp_path / "b"
    shutil.copytree(built, b)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(b / "work" / "fp32.onnx")], env=_child_env(),
                          timeout=CHILD_CAP_S)
    assert proc.returncode == -9
    left = list((b / "work").glob(".fp32.onnx.*.tmp"))
    assert len(left) == 1 and left[0].read_bytes() == b"half a graph"
    host = atomic.temp_name("x").split(".")[2].split("-")[0]
    kept = [b / "work" / f".plan.json.{host}-1.abcd1234.tmp",  # pid 1 runs
            b / "work" / f".plan.json.{'0' * 6 if host != '0' * 6 else '1' * 6}-999999.abcd1234.tmp",  # elsewhere
            b / ".model.onnx.abcd1234.tmp",  # old naming, young
            b / "notes.tmp", b / ".notes.tmp"]  # not ours
    old = b / "work" / ".dense.onnx.wxyz9876.tmp"  # old naming, two hours old
    for p in kept + [old]:
        p.write_text("x")
    os.utime(old, (time.time() - 7200,) * 2)
    code, _, err = run_cli(capsys, "export", str(b))  # current: skipped, but it takes the lock
    assert code == 0, err
    assert not left[0].exists() and not old.exists() and all(p.exists() for p in kept)


def test_pickle_refusal_is_our_own_line(tmp_path, capsys):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("this must never print",))

    torch.save({"params": {"w": torch.zeros(2)}, "x": Payload()}, tmp_path / "evil.pth")
    before = _tree(tmp_path)
    code, out, err = run_cli(capsys, "build", "--model", "edsr", "--budget", "0.4", "--weights",
                             str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o"))
    line = _one_error_line("evil.pth", code, err)
    assert line == (f"error: {tmp_path / 'evil.pth'} is a pickle that needs code (print) to load, and that code is "
                    "never run; give .safetensors, or a .pt/.pth holding only tensors (and dicts/lists of them)")
    assert "weights_only" not in err and "this must never print" not in out + err and _tree(tmp_path) == before


# --- issue 23: bundle integrity ---
# Every consumer (upscale, route, engine, pack, validate) opens a bundle through core/opening.py: recipe.yaml and
# every file it reads must match the recorded sha256, graphs pass onnx.checker and keep their weights inside,
# pack.json names only paths inside the bundle, and a tar is checked from its headers before anything is extracted.

import hashlib
import io
import shutil
import tarfile

import onnx
from onnx import numpy_helper


def _refused(capsys, tmp_path, args, codes=(1, 2), keep=()) -> str:
    """Run ``args``; assert exit 1 or 2, one error line, no traceback, nothing under tmp_path (nor in the folders
    ``keep``) created, changed or removed. Returns the line."""
    before = {f: _tree(f) for f in (tmp_path, *keep)}
    code, _, err = run_cli(capsys, *args)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code in codes, (args, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)
    for f, tree in before.items():
        assert _tree(f) == tree, (args, "created, changed or removed a file under", f)
    assert not [p for p in tmp_path.rglob("*") if ".unpack-" in p.name], args
    return lines[0]


def _copy(built, tmp_path, name="c"):
    dest = tmp_path / name
    shutil.copytree(built, dest, ignore=shutil.ignore_patterns("work"))
    return dest


def _rehash(bundle, *names):
    """What an attacker who also rewrites the manifest does: record the current sha256 of ``names``."""
    m = json.loads((bundle / "manifest.json").read_text())
    for n in names:
        m["files"][n] = hashlib.sha256((bundle / n).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(m))


def _photo(tmp_path, tiny_images):
    dest = tmp_path / "photo.png"
    shutil.copy(tiny_images["eval"] / "astronaut.png", dest)
    return dest


def test_upscale_refuses_a_graph_that_does_not_match_the_manifest(tmp_path, capsys, built, tiny_images):
    c = _copy(built, tmp_path)
    g = onnx.load(str(c / "model.onnx"))  # still a valid graph: only the hash tells
    t = g.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0, t.name))
    onnx.save(g, str(c / "model.onnx"))
    line = _refused(capsys, tmp_path, ["upscale", c, _photo(tmp_path, tiny_images), "-o", tmp_path / "o",
                                       "--no-progress"])
    assert "model.onnx was changed after it was written (sha256 mismatch)" in line


@pytest.mark.parametrize("edit", [("num_feat: 16", "num_feat: 32"), ("  scale: 4", "  scale: 2"),
                                  ("fp32_atol: 0.0001", "fp32_atol: 1.0")])
def test_an_edited_bundle_recipe_is_refused_by_upscale_and_validate(tmp_path, capsys, built, tiny_images, edit):
    c = _copy(built, tmp_path)
    text = (c / "recipe.yaml").read_text()
    assert edit[0] in text
    (c / "recipe.yaml").write_text(text.replace(edit[0], edit[1]))
    photo = _photo(tmp_path, tiny_images)
    for args in (["upscale", c, photo, "-o", tmp_path / "o", "--no-progress"],
                 ["validate", c, "--no-latency", "--no-progress"], ["engine", c, "--dry-run"]):
        line = _refused(capsys, tmp_path, args)
        assert "recipe.yaml was changed after it was written (sha256 mismatch)" in line, args


def test_a_bundle_without_a_recorded_recipe_hash_is_refused_until_its_build_runs_again(tmp_path, capsys, built,
                                                                                        tiny_images):
    """Bundles written before recipe.yaml was hashed: refused in one line naming the remedy (README); running
    the same build command again records the hash, skipping every finished stage, and the bundle works."""
    c = _copy(built, tmp_path)
    m = json.loads((c / "manifest.json").read_text())
    del m["files"]["recipe.yaml"]
    (c / "manifest.json").write_text(json.dumps(m))
    photo = _photo(tmp_path, tiny_images)
    for args in (["upscale", c, photo, "-o", tmp_path / "o", "--no-progress"], ["pack", c, "--out", tmp_path / "p.tar.gz"],
                 ["validate", c, "--no-latency"], ["engine", c, "--dry-run"]):
        line = _refused(capsys, tmp_path, args)
        assert "written by an older sls-deploy that did not record the sha256 of recipe.yaml; run the build " \
               "command that made it again" in line, args
    code, _, err = run_cli(capsys, "build", "--recipe", built.parent / "tiny.yaml", "--weights",
                           built.parent / "w.safetensors", "--budget", "0.9", "--method", "oneshot", "--n", "2",
                           "--out", c, "--no-progress")
    assert code == 0, err
    assert err.count("up to date") >= 1 and "finetune" in err
    assert json.loads((c / "manifest.json").read_text())["files"]["recipe.yaml"] == \
        hashlib.sha256((c / "recipe.yaml").read_bytes()).hexdigest()
    code, _, err = run_cli(capsys, "upscale", c, photo, "-o", tmp_path / "o", "--no-progress")
    assert code == 0 and (tmp_path / "o" / "photo.png").is_file(), err


def test_pack_refuses_a_truncated_graph_even_when_the_manifest_was_rehashed(tmp_path, capsys, built):
    c = _copy(built, tmp_path)
    (c / "model.onnx").write_bytes((c / "model.onnx").read_bytes()[:3000])
    _rehash(c, "model.onnx")
    line = _refused(capsys, tmp_path, ["pack", c, "--out", tmp_path / "c.tar.gz"])
    assert "model.onnx" in line and "corrupt" in line


def test_pack_runs_onnx_checker_on_what_it_packs(tmp_path, capsys, built):
    c = _copy(built, tmp_path)
    g = onnx.load(str(c / "model.fp16.onnx"))  # parses, but a node reads a tensor nothing produces
    g.graph.node[0].input[0] = "nowhere"
    onnx.save(g, str(c / "model.fp16.onnx"))
    _rehash(c, "model.fp16.onnx")
    line = _refused(capsys, tmp_path, ["pack", c, "--out", tmp_path / "c.tar.gz"])
    assert line.startswith("error: onnx.checker rejects model.fp16.onnx")


def test_pack_out_is_never_inside_the_bundle(tmp_path, capsys, built):
    c = _copy(built, tmp_path)
    for out in (c / "manifest.json", c / "new.tar.gz", c / "work" / ".." / "x.tar.gz"):
        line = _refused(capsys, tmp_path, ["pack", c, "--out", out, "--force"], codes=(2,))
        assert "is inside the bundle" in line


@pytest.fixture(scope="module")
def packed(built, tmp_path_factory):
    """A pack of ``built`` and its unpacked folder (as `engine` leaves it)."""
    from sls_deploy.cli import main

    tmp = tmp_path_factory.mktemp("packed")
    assert main(["pack", str(built), "--out", str(tmp / "dev.tar.gz")]) == 0
    assert main(["engine", str(tmp / "dev.tar.gz"), "--dry-run"]) == 0
    return tmp / "dev.tar.gz", tmp / "dev"


def test_pack_json_members_must_be_paths_inside_the_bundle(tmp_path, capsys, packed):
    """No absolute path, no '..', no symlink out: refused before any file is read, with the same message whether
    the outside file's hash was guessed right or not (no hash oracle)."""
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    right = hashlib.sha256(outside.read_bytes()).hexdigest()
    d = tmp_path / "d"
    shutil.copytree(packed[1], d, ignore=shutil.ignore_patterns("engine"))
    (d / "link").symlink_to(outside)
    meta = json.loads((d / "pack.json").read_text())
    lines = {}
    for name in (str(outside), "../secret.txt", "val/../../secret.txt", "link"):
        for sha in (right, "0" * 64):
            (d / "pack.json").write_text(json.dumps({**meta, "files": {**meta["files"], name: sha}}))
            lines[name, sha] = _refused(capsys, tmp_path, ["engine", d, "--dry-run"])
        assert lines[name, right] == lines[name, "0" * 64], name
        assert "not a relative path inside the bundle" in lines[name, right] or "leads out of the bundle" in \
            lines[name, right]


def _tar(path, members):
    """A gzipped tar written header by header: (TarInfo, data or None); a member with None has a header only, so
    it can declare any size while the file stays a few hundred bytes."""
    buf = io.BytesIO()
    for info, data in members:
        buf.write(info.tobuf(format=tarfile.GNU_FORMAT))
        if data is not None:
            buf.write(data + b"\0" * (-len(data) % 512))
    buf.write(b"\0" * 1024)
    path.write_bytes(__import__("gzip").compress(buf.getvalue()))
    return path


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


@pytest.mark.parametrize("case, message", [
    ("unlisted", "member 'huge.bin' is not listed in pack.json (refused, nothing was extracted)"),
    ("listed", "would unpack to more than 4 GiB"),
    ("link", "refusing suspicious member 'model.onnx'"),
    ("device", "refusing suspicious member 'dev'"),
    ("absolute", "refusing suspicious member '/tmp/x'"),
    ("dotdot", "refusing suspicious member '../x'"),
    ("twice", "member 'pack.json' appears twice"),
    ("no pack.json", "holds no pack.json"),
])
def test_a_tar_is_refused_from_its_headers_before_anything_is_extracted(tmp_path, capsys, case, message):
    listed = {"huge.bin": "0" * 64} if case == "listed" else {"recipe.yaml": "0" * 64}
    meta = json.dumps({"files": listed}).encode()
    head = [(_info("pack.json", len(meta)), meta)]
    members = {
        "unlisted": head + [(_info("huge.bin", 3 * 2**29), None)],  # declares 1.5 GiB, holds nothing
        "listed": head + [(_info("huge.bin", 5 * 2**30), None)],
        "link": head + [(_info("model.onnx", kind=tarfile.SYMTYPE, link="/etc/passwd"), b"")],
        "device": head + [(_info("dev", kind=tarfile.CHRTYPE), b"")],
        "absolute": head + [(_info("/tmp/x", 1), b"x")],
        "dotdot": head + [(_info("../x", 1), b"x")],
        "twice": head + head,
        "no pack.json": [(_info("recipe.yaml", 1), b"x")],
    }[case]
    tar = _tar(tmp_path / "dev.tar.gz", members)
    assert tar.stat().st_size < 4096
    line = _refused(capsys, tmp_path, ["engine", tar, "--dry-run"])
    assert message in line
    assert not (tmp_path / "dev").exists()


def test_tar_names_that_give_no_folder_and_other_files_are_one_line(tmp_path, capsys, packed):
    (tmp_path / "d").mkdir()
    for name in (".tar.gz", "..tgz", ".tar"):
        shutil.copy(packed[0], tmp_path / "d" / name)
    shutil.copy(packed[0], tmp_path / "d" / "dev.zip")
    for name in (".tar.gz", "..tgz", ".tar"):
        line = _refused(capsys, tmp_path, ["engine", tmp_path / "d" / name, "--dry-run"])
        assert "names none; rename it" in line
    line = _refused(capsys, tmp_path, ["validate", tmp_path / "d" / "dev.zip"])
    assert "is not a packed bundle: give a bundle folder or a .tar.gz, .tgz, .tar file" in line


def test_empty_or_outside_pointing_graphs_are_one_line_even_when_rehashed(tmp_path, capsys, built, tiny_images):
    photo = _photo(tmp_path, tiny_images)
    c = _copy(built, tmp_path)
    (c / "model.onnx").write_bytes(b"")
    _rehash(c, "model.onnx")
    line = _refused(capsys, tmp_path, ["upscale", c, photo, "-o", tmp_path / "o", "--no-progress"])
    assert "model.onnx is empty (0 bytes), not an ONNX model" in line
    shutil.rmtree(c)
    c = _copy(built, tmp_path)
    g = onnx.load(str(c / "model.onnx"))
    t = g.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.ClearField("float_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    onnx.save(g, str(c / "model.onnx"))
    _rehash(c, "model.onnx")
    for args in (["upscale", c, photo, "-o", tmp_path / "o", "--no-progress"], ["validate", c, "--no-latency"],
                 ["engine", c, "--dry-run", "--precision", "fp32"], ["pack", c, "--out", tmp_path / "p.tar.gz"]):
        line = _refused(capsys, tmp_path, args)
        assert "keeps its data outside the graph file ('../../../etc/passwd')" in line, args


def test_route_checks_every_member_against_its_manifest(tmp_path, capsys, built):
    from sls_deploy.adaptive.family import Family, FamilyMember

    fam = tmp_path / "fam"
    fam.mkdir()
    _copy(built, fam, "b0.40")
    _copy(built, fam, "b0.60")
    Family(fam, "edsr-tiny-x4", "oneshot", str(built.parent / "w.safetensors"),
           (FamilyMember(0.4, "b0.40"), FamilyMember(0.6, "b0.60"))).save()
    plan = json.loads((fam / "b0.60" / "plan.json").read_text())
    plan["budget"] = 0.5
    (fam / "b0.60" / "plan.json").write_text(json.dumps(plan))
    line = _refused(capsys, tmp_path, ["route", fam, "--steps", "1"])
    assert "b0.60: plan.json was changed after it was written (sha256 mismatch)" in line


def test_a_good_pack_round_trips_through_engine_and_validate(tmp_path, capsys, built):
    """.tar.gz, .tgz and .tar: `validate` and `engine --dry-run` unpack beside it, check every hash, and run."""
    for suffix in (".tar.gz", ".tgz", ".tar"):
        tar = tmp_path / f"dev{suffix}"
        if suffix == ".tar":
            with tarfile.open(tmp_path / "dev.tar.gz") as src, tarfile.open(tar, "w") as dst:
                for m in src.getmembers():
                    dst.addfile(m, src.extractfile(m))
        else:
            code, _, err = run_cli(capsys, "pack", built, "--out", tar)
            assert code == 0, err
        name = f"v{suffix.replace('.', '_')}"
        shutil.copy(tar, tmp_path / f"{name}{suffix}")
        code, out, err = run_cli(capsys, "validate", tmp_path / f"{name}{suffix}")
        assert code == 0, err
        res = json.loads(out)
        assert res["passed"] and res["packed"] and res["eval_images"] == ["astronaut.png", "chelsea.png"]
        assert {r["backend"] for r in res["shapes"]} == {"onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8"}
        assert (tmp_path / name / "pack.json").is_file() and not (tmp_path / name / "model.safetensors").exists()
        code, out, err = run_cli(capsys, "engine", tmp_path / f"{name}{suffix}", "--dry-run")  # reuses the folder
        assert code == 0 and "trtexec --onnx=model.fp16.onnx" in out, err
        assert (tmp_path / name / "engine" / "build.json").is_file()
    code, _, err = run_cli(capsys, "validate", tmp_path / "v_tgz", "--backend", "torch")
    assert code == 2 and "carries no PyTorch weights" in err


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
        ([p, "-o", str(tmp / "L"), "--force"], "(a link) exists and is a character device", 1),
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


# --- issue 23: round-up ---
# What the merged helpers left: JSON read within bounds (size before reading, nesting before parsing), an unpack's
# full disk and killed runs, upscale's video temp and empty folder, a graph whose scale is not the recipe's, a
# family's own files hashed and its members plain folder names, pack --out by the one bundle rule. Each refusal:
# exit 1 or 2, one line, no traceback, nothing created, changed or removed (lock files hold the pid of the last
# command: not artifacts).


def _files(folder) -> dict:
    return {k: v for k, v in _snapshot(folder).items() if not k.endswith(".sls-deploy.lock")}


def _one_line_refusal(capsys, tmp_path, args, codes=(1, 2)) -> str:
    before = _files(tmp_path)
    code, _, err = run_cli(capsys, *args)
    line = _one_error_line(args, code, err)
    assert code in codes, (args, code, line)
    assert _files(tmp_path) == before, (args, "created, changed or removed something")
    return line


def _deep(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def test_deep_or_huge_json_files_are_one_line(tmp_path, capsys, built, tiny_images):
    """A 100k-deep plan.json, manifest.json, family.json, pack.json or upscale record raised RecursionError; a
    50 MB manifest.json was read whole. Now: refused from its size before reading, from its bracket depth before
    parsing, in one line naming the file."""
    photo = _photo(tmp_path, tiny_images)
    plan = _copy(built, tmp_path, "plan")
    (plan / "plan.json").write_text(_deep())
    _rehash(plan, "plan.json")  # it gets past the hash check to the parser
    deep = _copy(built, tmp_path, "deep")
    (deep / "manifest.json").write_text(_deep())
    huge = _copy(built, tmp_path, "huge")
    with open(huge / "manifest.json", "r+b") as f:  # 50 MB (sparse: no disk is used)
        f.truncate(50 * 2**20)
    fam = tmp_path / "fam"
    fam.mkdir()
    (fam / "family.json").write_text(_deep())
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "pack.json").write_text(_deep())
    (packed / "recipe.yaml").write_text("x: 1\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "photo.png").write_text("mine")
    (out / ".sls-upscale.json").write_text(_deep())  # unreadable: counts as no record, photo.png is the user's
    cases = [
        (["upscale", plan, photo, "-o", tmp_path / "o2", "--backend", "torch", "--no-progress"],
         f"{plan / 'plan.json'} is not a valid plan (nested 100000 levels deep; at most 64)"),
        (["validate", plan, "--no-latency"], "plan.json is not a valid plan (nested 100000 levels deep"),
        (["export", plan], "plan.json is not a valid plan (nested 100000 levels deep"),
        *[([cmd, deep, *rest], f"{deep / 'manifest.json'} is not a valid manifest (nested 100000 levels deep")
          for cmd, *rest in (["validate", "--no-latency"], ["upscale", photo, "-o", tmp_path / "o2"], ["pack"],
                             ["engine", "--dry-run"], ["export"], ["finetune"])],
        *[([cmd, huge, *rest], f"manifest {huge / 'manifest.json'} is larger than 16 MiB")
          for cmd, *rest in (["validate", "--no-latency"], ["upscale", photo, "-o", tmp_path / "o2"], ["pack"],
                             ["engine", "--dry-run"])],
        (["route", fam], f"{fam / 'family.json'} is not a valid family file (nested 100000 levels deep"),
        (["engine", fam, "--dry-run"], "is not a valid family file (nested 100000 levels deep"),
        (["engine", packed, "--dry-run"], f"{packed / 'pack.json'} is not a valid pack.json (nested 100000 levels"),
        (["validate", packed], "is not a valid pack.json (nested 100000 levels deep"),
        (["upscale", built, photo, "-o", out, "--no-progress"], "is not an unchanged output of an earlier upscale"),
    ]
    for args, fragment in cases:
        line = _one_line_refusal(capsys, tmp_path, args)
        assert fragment in line and len(line) < 400, (args, line)
    assert (out / "photo.png").read_text() == "mine"
    from sls_deploy.stages.validate_engine import recorded_gate  # `validate PACK --backend trt` (needs TensorRT)

    (packed / "report.json").write_text(_deep())
    assert recorded_gate(packed) == "not measured (no readable report.json: validate the bundle before packing it)"


def test_safe_json_reads_what_json_reads_within_its_bounds(tmp_path):
    from sls_deploy.core.errors import PlanError
    from sls_deploy.core.safe_json import MAX_DEPTH, load_json, nesting_depth

    value = {"a": ["[{", {"b": "\\\"]]", "c": [[1, 2.5, None, True]]}], "d": "\\\\", "e": "é ]"}
    (tmp_path / "ok.json").write_text(json.dumps(value))
    assert load_json(tmp_path / "ok.json", "plan") == value
    assert nesting_depth(json.dumps(value).encode()) == 5  # brackets inside strings, escaped quotes not counted
    limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    (tmp_path / "limit.json").write_text(limit)
    assert load_json(tmp_path / "limit.json", "plan") == json.loads(limit)
    os.mkfifo(tmp_path / "fifo.json")  # never blocks
    refused = {
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1): f"(nested {MAX_DEPTH + 1} levels deep; at most {MAX_DEPTH})",
        "{not json": "is not a valid kept units file (Expecting property name enclosed in double quotes at line 1",
        "[1" + "0" * 5000 + "]": "is not a valid kept units file (ValueError)",
        b"\xff\xfe": "is not a valid kept units file (not UTF-8 text: byte 0)",
        "fifo": "kept units file",
    }
    for text, fragment in refused.items():
        path = tmp_path / "fifo.json" if text == "fifo" else tmp_path / "bad.json"
        if text != "fifo":
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(PlanError) as e:
            load_json(path, "kept units file", PlanError)
        assert fragment in str(e.value) and str(path) in str(e.value), str(e.value)[:300]
    assert "is not a regular file" in str(e.value)


def _routed_family(tmp_path, built) -> Path:
    """A family of two copies of ``built`` with one router (the FP32 graph stands in for it: `engine --dry-run`
    never runs it) and adaptive.json, recorded in family.json as `route` records them."""
    from sls_deploy.adaptive.family import Family, FamilyMember
    from sls_deploy.core.atomic import sha256_file

    fam = tmp_path / "fam"
    fam.mkdir()
    _copy(built, fam, "b0.40")
    _copy(built, fam, "b0.60")
    shutil.copy(built / "model.onnx", fam / "router-edge.onnx")
    (fam / "adaptive.json").write_text(json.dumps({"patch": {"size": 8, "stride": 6}, "routers": {"edge": {}}}))
    Family(fam, "edsr-tiny-x4", "oneshot", str(built.parent / "w.safetensors"),
           (FamilyMember(0.4, "b0.40"), FamilyMember(0.6, "b0.60")),
           files={f: sha256_file(fam / f) for f in ("router-edge.onnx", "adaptive.json")}).save()
    return fam


def test_a_familys_own_files_are_checked_and_members_are_plain_folder_names(tmp_path, capsys, built):
    """`engine FAMILY` built router engines from graphs nothing had hashed, and a member folder could be any path.
    Now family.json records what route wrote; engine checks it before writing anything, and members are plain
    folder names inside the family folder (not '..', not absolute, not a link)."""
    fam = _routed_family(tmp_path, built)
    code, out, err = run_cli(capsys, "engine", fam, "--dry-run", "--precision", "fp32")
    assert code == 0 and out.count("# family member") == 2 and "# router edge" in out, err
    assert json.loads((fam / "routers" / "edge" / "engine" / "build.json").read_text())["settings"]["graph"] == \
        "../../router-edge.onnx"
    family = json.loads((fam / "family.json").read_text())
    elsewhere = _copy(built, tmp_path, "elsewhere")

    def with_family(**changes):
        (fam / "family.json").write_text(json.dumps({**family, **changes}))

    def members(*folders):
        return [{"budget": 0.4 + 0.2 * i, "folder": f} for i, f in enumerate(folders)]

    cases = [
        (lambda: shutil.copy(built / "model.fp16.onnx", fam / "router-edge.onnx"),
         f"family {fam}: router-edge.onnx was changed after it was written (sha256 mismatch)"),
        (lambda: (fam / "adaptive.json").write_text(json.dumps({"patch": {"size": 9, "stride": 6},
                                                                  "routers": {"edge": {}}})),
         f"family {fam}: adaptive.json was changed after it was written (sha256 mismatch)"),
        (lambda: with_family(files={}),
         "adaptive.json is not recorded in family.json (written by an older sls-deploy or not by route; run "
         f"`sls-deploy route {fam}` again)"),
        (lambda: with_family(members=members("b0.40", "../elsewhere")),
         "member folder '../elsewhere' is not a plain folder name inside the family folder"),
        (lambda: with_family(members=members("b0.40", str(elsewhere))),
         f"member folder '{str(elsewhere)[:10]}"),
        (lambda: with_family(members=members("b0.40", "b0.60/../../elsewhere")), "is not a plain folder name"),
        (lambda: (fam / "b0.80").symlink_to(elsewhere) or with_family(members=members("b0.40", "b0.80")),
         f"family member b0.80 in {fam} is a link"),
    ]
    for make, fragment in cases:
        saved = {p: p.read_bytes() for p in (fam / "family.json", fam / "router-edge.onnx", fam / "adaptive.json")}
        make()
        for args in (["engine", fam, "--dry-run", "--precision", "fp32"], ["route", fam, "--steps", "1"]):
            if "family member" not in fragment and "member folder" not in fragment and "plain" not in fragment \
                    and args[0] == "route":
                continue  # route writes the routers: it does not read them
            line = _one_line_refusal(capsys, tmp_path, args)
            assert fragment in line, (fragment, line)
        for p, data in saved.items():
            p.write_bytes(data)
        if (fam / "b0.80").is_symlink():
            (fam / "b0.80").unlink()
    # adaptive.json naming a router outside the folder: refused even when family.json was re-recorded for it
    from sls_deploy.core.atomic import sha256_file

    (fam / "adaptive.json").write_text(json.dumps({"patch": {"size": 8, "stride": 6}, "routers": {"../../x": {}}}))
    with_family(files={**family["files"], "adaptive.json": sha256_file(fam / "adaptive.json")})
    line = _one_line_refusal(capsys, tmp_path, ["engine", fam, "--dry-run", "--precision", "fp32"])
    assert "lists router '../../x', not a plain name (refused)" in line


def test_upscale_with_a_graph_of_another_scale_is_one_line(tmp_path, capsys, built, tiny_images):
    """recipe.yaml says x2 (re-hashed, so it passes the manifest check), the graph makes x4: tiling raised a plain
    ValueError traceback."""
    c = _copy(built, tmp_path)
    (c / "recipe.yaml").write_text((c / "recipe.yaml").read_text().replace("  scale: 4", "  scale: 2"))
    m = json.loads((c / "manifest.json").read_text())
    m["files"]["recipe.yaml"] = hashlib.sha256((c / "recipe.yaml").read_bytes()).hexdigest()
    (c / "manifest.json").write_text(json.dumps(m))
    line = _one_line_refusal(capsys, tmp_path, ["upscale", c, _photo(tmp_path, tiny_images), "-o", tmp_path / "o",
                                                "--no-progress"])
    assert "the model returned 1x3x" in line and "of scale x2: the graph does not match the bundle's recipe" in line
    assert not (tmp_path / "o").exists()


def test_pack_out_follows_the_one_bundle_rule(tmp_path, capsys, built):
    c, other = _copy(built, tmp_path), _copy(built, tmp_path, "other")
    (tmp_path / "link.tar.gz").symlink_to(c / "manifest.json")
    os.mkfifo(tmp_path / "fifo.tar.gz")
    for out, fragment, code in ((other / "c.tar.gz", f"is inside the bundle {other}", 2),
                                (other / "work" / "c.tar.gz", f"is inside the bundle {other}", 2),
                                (tmp_path / "link.tar.gz", f"is inside the bundle {c}", 2),
                                (tmp_path / "fifo.tar.gz", "is a fifo, not a regular file: it is never replaced", 1)):
        line = _one_line_refusal(capsys, tmp_path, ["pack", c, "--out", out, "--force"], codes=(code,))
        assert fragment in line, (out, line)


_KILLED = r"""
import os, signal, sys
from pathlib import Path

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "unpack":  # killed once every member is extracted, before the folder takes its name
    from sls_deploy.core import packing
    packing.verify_packed = die
    packing.unpack(Path(sys.argv[2]))
else:  # killed once upscale's first video frame went to ffmpeg
    from sls_deploy.upscale import media, run
    first = media.VideoWriter.append
    media.VideoWriter.append = lambda self, frame: (first(self, frame), die())
    run.upscale(Path(sys.argv[2]), [sys.argv[3]], Path(sys.argv[4]), progress=False)
"""


def test_killed_unpack_and_video_upscale_leave_temps_the_next_run_removes(tmp_path, capsys, built, packed):
    """SIGKILL during an unpack left `.dev.unpack-*` folders, during a video upscale `.clip.<pid>.tmp.mp4`: nothing
    removed them. Now both are named as core/atomic.py names temporaries and the next unpack / upscale removes
    those whose process is gone (and the old names once an hour old); a live writer's stay."""
    import time

    from sls_deploy.core import atomic

    shutil.copy(packed[0], tmp_path / "dev.tar.gz")
    proc = subprocess.run([sys.executable, "-c", _KILLED, "unpack", str(tmp_path / "dev.tar.gz")], env=_child_env(),
                          timeout=CHILD_CAP_S)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".dev.")]
    assert len(left) == 1 and left[0].is_dir() and (left[0] / "model.onnx").is_file() and left[0].name.endswith(".tmp")
    live = tmp_path / atomic.temp_name(tmp_path / "dev").replace(f"-{os.getpid()}.", "-1.")  # pid 1 runs
    (live := live.with_name(live.name + "abcd1234.tmp")).mkdir()
    old, young = tmp_path / ".dev.unpack-wxyz9876", tmp_path / ".dev.unpack-abcd1234"  # the earlier naming
    for d in (old, young):
        d.mkdir()
        (d / "model.onnx").write_text("x")
    os.utime(old, (time.time() - 7200,) * 2)
    code, out, err = run_cli(capsys, "engine", tmp_path / "dev.tar.gz", "--dry-run")
    assert code == 0 and "trtexec" in out, err
    assert not left[0].exists() and not old.exists() and live.is_dir() and young.is_dir()
    assert (tmp_path / "dev" / "pack.json").is_file()

    _video(tmp_path / "clip.mp4", 12, (16, 16))
    o = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", _KILLED, "upscale", str(built), str(tmp_path / "clip.mp4"), str(o)],
                          env=_child_env(), timeout=CHILD_CAP_S)
    assert proc.returncode == -9
    temps = [p.name for p in o.iterdir()]
    assert len(temps) == 1 and temps[0].startswith(".clip.mp4.") and temps[0].endswith(".tmp"), temps
    legacy = o / ".clip.12345.tmp.mp4"  # what an earlier version left
    legacy.write_text("x")
    os.utime(legacy, (time.time() - 7200,) * 2)
    code, _, err = run_cli(capsys, "upscale", built, tmp_path / "clip.mp4", "-o", o, "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in o.iterdir()) == [".sls-upscale.json", "clip.mp4"]


def test_full_disk_during_unpack_and_video_upscale_is_one_line_and_leaves_no_folder(tmp_path, built, packed,
                                                                                    tiny_images):
    """Extraction onto a full disk read "cannot read ... as a packed bundle: [Errno 28] ..."; a video upscale's
    temporary file bypassed the full-disk conversion; upscale left the empty -o folder it had created."""
    why = _namespace_mounts()
    if why:
        pytest.skip(why)
    script = _DISK_FULL.replace('"temps":', '"dirs": sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") '
                                           'if p.is_dir()), "temps":')
    assert script != _DISK_FULL
    src, tars, clips = tmp_path / "src", tmp_path / "tars", tmp_path / "clips"
    shutil.copytree(built, src)
    tars.mkdir()
    shutil.copy(packed[0], tars / "dev.tar.gz")
    clips.mkdir()
    import imageio.v2 as iio2
    import numpy as np

    with iio2.get_writer(str(clips / "clip.mp4"), "ffmpeg", fps=12, codec="libx264", macro_block_size=1,
                         ffmpeg_log_level="error") as w:  # noise: its 4x version is far larger than the disk's slack
        for frame in np.random.default_rng(0).integers(0, 256, (30, 48, 48, 3), dtype=np.uint8):
            w.append_data(frame)
    photo = next(Path(tiny_images["eval"]).glob("*.png"))
    mnt = tmp_path / "m"
    cases = [
        {"name": "unpack", "copy": str(tars), "slack": 65536, "argv": ["engine", str(mnt / "unpack" / "b" / "dev.tar.gz"),
                                                                      "--dry-run"], "file": "dev", "dirs": ["b"]},
        {"name": "video", "slack": 8192, "argv": ["upscale", str(src), str(clips / "clip.mp4"), "-o",
                                                  str(mnt / "video" / "o" / "deeper"), "--no-progress"],
         "file": "clip.mp4", "dirs": []},
        {"name": "image", "slack": 8192, "argv": ["upscale", str(src), str(photo), "-o", str(mnt / "image" / "o"),
                                                  "--no-progress"], "file": photo.name, "dirs": []},
    ]
    for c in cases:
        c["mount"] = str(mnt / c["name"])
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", script, json.dumps(cases)], cwd=tmp_path,
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c, r in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        line = _one_error_line(c["name"], r["code"], r["err"])
        assert line.startswith("error: no space left on ") and f"{c['file']} was not written" in line, line
        assert r["temps"] == [] and r["after"] == r["before"] and r["dirs"] == c["dirs"], (c["name"], r)


@pytest.mark.parametrize("model", ["edsr", "basicvsr", "deblur"])
def test_an_infinite_model_width_is_one_recipe_line(tmp_path, model):
    """Hypothesis found `model.num_feat: .inf` (int() of infinity: OverflowError, a traceback)."""
    raw = yaml.safe_load(recipe_for_model(model).read_text())
    for key in ("num_feat", "num_block"):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(raw, model={**raw["model"], key: float("inf")})))
        with pytest.raises(SlsError) as e:
            load_recipe(tmp_path / "r.yaml")
        assert str(e.value) == "model section: cannot convert float infinity to integer"


_WHOLE_PROCESS = r"""
import json, os, subprocess, sys
from pathlib import Path
mnt = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
st = os.statvfs(mnt)
with open(mnt / "fill", "wb") as f:  # leave 8 KB: the 4x PNG does not fit
    f.write(b"\0" * (st.f_bavail * st.f_frsize - 8192))
proc = subprocess.run([sys.executable, "-c", "import sys; from sls_deploy.cli import main; sys.exit(main())",
                       *sys.argv[2:]], capture_output=True, text=True)
print(json.dumps({"code": proc.returncode, "err": proc.stderr, "left": sorted(p.name for p in mnt.iterdir())}))
"""


def test_full_disk_under_upscale_is_one_line_to_the_end_of_the_process(tmp_path, built):
    """What the console script prints until the interpreter exits (benchmarks/hostile_inputs.py found it): imageio's
    PNG writer held the output file, a full disk failed its close, and its __del__ closed again at exit, printing
    "Exception ignored in: <function PluginV3.__del__> ... Traceback ... No space left on device" after the error
    line. Now the PNG is encoded in memory and written through atomic_path."""
    why = _namespace_mounts()
    if why:
        pytest.skip(why)
    src, mnt = tmp_path / "src", tmp_path / "m"
    shutil.copytree(built, src)  # this process holds the lock of `built`
    mnt.mkdir()
    # a 20x24 crop: its 4x PNG (~20 KB) is written within the file's buffer and fails only when it is closed
    import imageio.v3 as iio
    from sls_deploy.data.sources import skimage_data_dir

    photo = tmp_path / "photo.png"
    iio.imwrite(photo, iio.imread(skimage_data_dir() / "astronaut.png")[200:220, 200:224])
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _WHOLE_PROCESS, str(mnt), "upscale", str(src),
                           str(photo), "-o", str(mnt / "o"), "--no-progress"], env=_child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["code"] == 1 and r["err"].splitlines() == [
        f"error: no space left on {mnt / 'o'}: {photo.name} was not written (no partial file is kept; free some "
        "space and run the same command again)"], r["err"][-3000:]
    assert r["left"] == ["fill"]


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


# --- issue 24: device and precision -----------------------------------------------------------------------------
# --device / --amp / --channels-last and the recipe's compute section on a machine without CUDA (torch.cuda is made
# to say so, as on CI, whatever this machine has): a value that cannot work here is one line, exit 2 (an option or
# the recipe's compute default) or 1 (a malformed recipe section), before anything is written; a bundle is left byte
# for byte as it was.

import torch  # noqa: E402


def _device_cases(tmp: Path, bundle: Path, images) -> list[tuple[list[str], int, str]]:
    from conftest import TINY_RECIPE

    def recipe(name: str, compute) -> str:
        raw = {**TINY_RECIPE, "data": {"train": str(images["train"]), "eval": str(images["eval"])},
               "compute": compute}
        (tmp / name).write_text(yaml.safe_dump(raw))
        return str(tmp / name)

    picture = str(next(images["eval"].iterdir()))
    b, edsr = str(bundle), ["--model", "edsr", "--budget", "0.4"]
    return [
        (["build", *edsr, "--device", "cuda", "--out", "o1"], 2, "--device cuda: CUDA is not available here"),
        (["build", *edsr, "--device", "cuda:0", "--out", "o1"], 2, "--device cuda:0: CUDA is not available here"),
        (["build", *edsr, "--device", "cuda:x", "--out", "o1"], 2, "--device must be auto, cpu, cuda or cuda:N"),
        (["build", *edsr, "--device", "gpu", "--out", "o1"], 2, "not 'gpu'"),
        (["build", *edsr, "--device", "", "--out", "o1"], 2, "--device must be"),
        (["build", *edsr, "--device", "cuda:-1", "--out", "o1"], 2, "--device must be"),
        (["build", *edsr, "--device", "cuda:" + "9" * 4000, "--out", "o1"], 2, "..."),
        (["build", *edsr, "--amp", "fp16", "--out", "o2"], 2, "--amp fp16 needs a CUDA device"),
        (["build", *edsr, "--amp", "fp8", "--out", "o2"], 2, "Invalid value for '--amp'"),
        (["build", *edsr, "--channels-last", "yes", "--out", "o2"], 2, "Invalid value for '--channels-last'"),
        (["search", *edsr, "--device", "cuda", "--out", "o3"], 2, "CUDA is not available"),
        (["search", *edsr, "--amp", "fp16", "--out", "o3"], 2, "--amp fp16 needs a CUDA device"),
        (["train", "--model", "edsr", "--out", "t.safetensors", "--device", "cuda"], 2, "CUDA is not available"),
        (["train", "--model", "edsr", "--out", "t.safetensors", "--amp", "fp16"], 2,
         "--amp fp16 needs a CUDA device"),
        (["finetune", b, "--device", "cuda"], 2, "CUDA is not available"),
        (["finetune", b, "--device", "cuda:1"], 2, "CUDA is not available"),
        (["finetune", b, "--amp", "fp16"], 2, "--amp fp16 needs a CUDA device"),
        (["validate", b, "--device", "cuda"], 2, "CUDA is not available"),
        (["validate", b, "--device", "npu"], 2, "--device must be"),
        (["upscale", b, picture, "-o", "up", "--device", "cuda"], 2, "CUDA is not available"),
        (["upscale", b, picture, "-o", "up", "--backend", "torch", "--device", "cuda:0"], 2,
         "CUDA is not available"),
        (["build", "--recipe", recipe("c1.yaml", {"device": "cuda"}), "--budget", "0.5", "--out", "o4"],
         2, "the recipe's compute.device cuda: CUDA is not available here"),
        (["train", "--recipe", recipe("c2.yaml", {"amp": "fp16"}), "--out", "t.safetensors"],
         2, "the recipe's compute.amp fp16 needs a CUDA device"),
        (["build", "--recipe", recipe("c3.yaml", {"device": "tpu"}), "--budget", "0.5", "--out", "o5"],
         1, "compute.device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
        (["build", "--recipe", recipe("c4.yaml", {"amp": True}), "--budget", "0.5", "--out", "o5"],
         1, "compute.amp must be one of off, bf16, fp16, not True"),
        (["build", "--recipe", recipe("c5.yaml", ["cuda"]), "--budget", "0.5", "--out", "o5"],
         1, "recipe section 'compute' must be a mapping"),
    ]


def test_device_and_precision_refusals_are_one_line_and_write_nothing(tmp_path, capsys, built, monkeypatch,
                                                                      tiny_images):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bundle_before = _artifacts(built)
    cases = _device_cases(tmp_path, built, tiny_images)
    for args, want, fragment in cases:
        before = _tree(tmp_path)
        code, _, err = run_cli(capsys, *args)
        line = _one_error_line(args, code, err)
        assert code == want, (args, code, line)
        assert fragment in line and len(line) < 400, (args, line)
        assert _tree(tmp_path) == before, (args, "created, changed or removed a file")
        assert _artifacts(built) == bundle_before, args
    assert len(cases) >= 25


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=12) | st.sampled_from(["cuda", "cuda:0", "cuda:1", "CUDA", "cpu:0", "auto ", "mps"]))
def test_any_device_text_without_cuda_is_one_line_exit_2(tmp_path_factory, capsys, monkeypatch, text):
    from hypothesis import assume

    assume(text not in ("auto", "cpu") and not text.startswith("-") and "\x00" not in text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path_factory.mktemp("dev")
    code, _, err = run_cli(capsys, "train", "--model", "edsr", "--out", str(folder / "w.safetensors"), "--device",
                           text)
    line = _one_error_line(text, code, err)
    assert code == 2 and "--device" in line and len(line) < 300
    assert list(folder.iterdir()) == []


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([("compute",), ("compute", "device"), ("compute", "amp"),
                              ("compute", "channels_last"), ("compute", "gpus")]), value=WEIRD)
def test_any_compute_section_value_loads_or_is_one_typed_error(tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(_set(EDSR, field, value)))
    try:
        r = load_recipe(path)
    except SlsError as e:
        assert "\n" not in str(e) and str(e) and len(str(e)) < 400
    else:
        assert r.compute.device in ("auto", "cpu") or r.compute.device.startswith("cuda")
        assert r.compute.amp in ("off", "bf16", "fp16") and r.compute.channels_last in ("off", "on", "cuda")
