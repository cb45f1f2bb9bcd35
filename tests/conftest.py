"""Shared fixtures: a tiny EDSR recipe, its random base weights, and tiny real images."""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import sls_deploy
from sls_deploy.data.images import read_rgb
from sls_deploy.data.sources import skimage_data_dir

# The source checkout (README, benchmarks/, recipes/, cli.py, pyproject.toml): the tests' parent folder unless
# SLS_DEPLOY_CHECKOUT names it. The package under test is whichever sls_deploy is imported, source or installed.
CHECKOUT = Path(os.environ.get("SLS_DEPLOY_CHECKOUT") or Path(__file__).resolve().parent.parent)
INSTALLED_ONLY = "SLS_DEPLOY_TEST_INSTALLED"  # set by .ci/test: the run must test the installed package


def site_packages() -> set[Path]:
    return {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}


def imported_from_site_packages(package_file: str | os.PathLike, checkout: Path = CHECKOUT) -> bool:
    """Is ``package_file`` (sls_deploy/__init__.py as imported) the installed package: directly in this
    interpreter's site-packages, and not the checkout's source folder?"""
    pkg = Path(package_file).resolve().parent
    return pkg.parent in site_packages() and pkg != (checkout / "sls_deploy").resolve()


def pytest_sessionstart(session):
    if os.environ.get(INSTALLED_ONLY) == "1" and not imported_from_site_packages(sls_deploy.__file__):
        pytest.exit(f"{INSTALLED_ONLY}=1 but sls_deploy was imported from {Path(sls_deploy.__file__).parent}, not "
                    f"from site-packages ({', '.join(sorted(map(str, site_packages())))}): run the `pytest` console "
                    "script (not `python -m pytest`) outside the checkout, as .ci/test does", returncode=1)


def same_package_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess (``python -m sls_deploy.cli``, torchrun) that imports the same sls_deploy as
    this test run: the source folder is put on PYTHONPATH when that is what runs; an installed one needs nothing."""
    env = {**os.environ, **extra}
    if not imported_from_site_packages(sls_deploy.__file__):
        root = str(Path(sls_deploy.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return env


TINY_RECIPE = {
    "name": "edsr-tiny-x4",
    "model": {"arch": "edsr", "scale": 4, "num_feat": 16, "num_block": 2, "res_scale": 1.0},
    "reference_output": [128, 96],
    "data": {"train": "", "eval": "", "metric_channel": "y"},  # filled per test
    "train": {"steps": 3, "lr": 1e-3, "batch_size": 2, "lr_patch": 8, "checkpoint_every": 2},
    "finetune": {"steps": 4, "lr": 1e-3, "batch_size": 2, "lr_patch": 8, "checkpoint_every": 2},
    "sparsity": {"method": "oneshot", "m": 4, "target": "none"},  # a 16-channel model: no TensorRT 2:4 gain
    # the TorchScript exporter, pinned for the suite's speed (a tiny graph: ~0.3 s, vs seconds through dynamo); the
    # default (dynamo, opset 18) is what `export={}` gives, and tests of every model family build through it
    "export": {"opset": 17, "exporter": "torchscript"},
    # the quality gate is reported but not enforced: these random-weight models are below bicubic by design (what
    # the tests using them check is shapes, graphs, files and errors); tests/test_quality_gate.py enforces it
    "validate": {"sizes": [[9, 13]], "odd_size": [11, 7], "fp32_atol": 1e-4, "latency_warmup": 1, "latency_runs": 3,
                 "max_drop_vs_dense_db": None, "min_gain_vs_baseline_db": None},
    "engine": {"min": [1, 8, 8], "opt": [1, 16, 24], "max": [1, 24, 32]},
    # a tiny model's MACs are ~1000x smaller than EDSR-baseline's: a larger lambda and a fast score LR let the
    # search reach its budget within the test's few steps
    "sls": {"lam": 1e-3, "score_lr": 0.3, "check_every": 1, "refresh_every": 2, "max_search_steps": 3},
}


def torchscript(spec):
    """An adapter's ExportSpec on the TorchScript exporter (opset 17): tests exporting video graphs where the exporter
    is not what they check (seconds each, against a minute or more through the default dynamo exporter)."""
    return dataclasses.replace(spec, exporter="torchscript", opset=17)


def _crop(name: str, y: int, x: int, h: int, w: int) -> np.ndarray:
    img = read_rgb(skimage_data_dir() / name)
    return (np.round(img[y:y + h, x:x + w] * 255)).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny real photographs (crops of scikit-image's bundled images)."""
    root = tmp_path_factory.mktemp("images")
    train, evald = root / "train", root / "eval"
    train.mkdir()
    evald.mkdir()
    iio.imwrite(train / "coffee.png", _crop("coffee.png", 100, 200, 64, 80))
    iio.imwrite(train / "rocket.png", _crop("rocket.jpg", 200, 200, 72, 64))
    iio.imwrite(evald / "astronaut.png", _crop("astronaut.png", 100, 180, 64, 64))
    iio.imwrite(evald / "chelsea.png", _crop("chelsea.png", 80, 120, 56, 68))
    return {"train": train, "eval": evald}


def write_tiny_recipe(folder: Path, images: dict[str, Path], **extra) -> Path:
    """The tiny recipe with the given train/eval image folders (and extra top-level sections) as a YAML file."""
    r = {**TINY_RECIPE, "data": {"train": str(images["train"]), "eval": str(images["eval"]), "metric_channel": "y"},
         **extra}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def write_tiny_weights(recipe: Path, dest: Path) -> Path:
    """Random (seeded) base weights for a recipe's model, as safetensors."""
    from sls_deploy.config.recipe import load_recipe

    torch.manual_seed(0)
    model = load_recipe(recipe).build_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest))
    return dest


@pytest.fixture
def tiny_recipe(tmp_path, tiny_images) -> Path:
    return write_tiny_recipe(tmp_path, tiny_images)


@pytest.fixture
def tiny_weights(tmp_path, tiny_recipe) -> Path:
    return write_tiny_weights(tiny_recipe, tmp_path / "tiny_base.safetensors")


def build_tiny_2to4_bundle(folder: Path, images: dict[str, Path]) -> Path:
    """A tiny one-shot 2:4 build with all three graphs (FP32, FP16, INT8) in ``folder / "b"``."""
    from sls_deploy.cli import main

    recipe = write_tiny_recipe(folder, images)
    weights = write_tiny_weights(recipe, folder / "w.safetensors")
    out = folder / "b"
    assert main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.9", "--method",
                 "oneshot", "--n", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`sls-deploy ARGS` in-process: (exit code, stdout, stderr)."""
    from sls_deploy.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    """Stage progress may precede it, but the error itself is exactly one line and no traceback."""
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


def data_error(fn, *args, **kw) -> str:
    """The one-line DataError message that ``fn(*args, **kw)`` raises."""
    from sls_deploy.core.errors import DataError

    with pytest.raises(DataError) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg
