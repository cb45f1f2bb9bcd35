"""The wheel holds the whole package: every sub-package and module of sls_deploy/, the recipes, calibration images
and base weights (sls_deploy/recipes and sls_deploy/calib are symbolic links), and the console script, whether pip
builds it from the source tree or from the sdist. A hand-written package list once left sls_deploy.upscale and
sls_deploy.adaptive out of the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import CHECKOUT

# What the build reads from the checkout (pyproject's readme, the package, the targets of its symbolic links);
# built from a copy so that a stale build/ folder in the checkout cannot leak old files into the wheel.
BUILD_INPUTS = ("pyproject.toml", "README.md", "sls_deploy", "recipes", "calib")
DATA = {"recipes": ("*.yaml",), "calib": ("*.png", "*.md"), "weights": ("*.safetensors", "*.md")}


def _source_modules() -> set[str]:
    """sls_deploy/**/*.py in the checkout, symbolic links followed, as wheel member names."""
    found = set()
    for folder, dirs, files in os.walk(CHECKOUT / "sls_deploy", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {(Path(folder) / f).relative_to(CHECKOUT).as_posix() for f in files if f.endswith(".py")}
    return found


def _pip_wheel(source: Path, dest: Path) -> Path:
    """pip's own wheel build of a source tree or an sdist, with this environment's setuptools (the test extra)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dest), str(source)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dest.glob("sls_deploy-*.whl")
    return wheel


@pytest.fixture(scope="module", params=["tree", "sdist"])
def wheel(request, tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp(f"wheel-{request.param}")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = CHECKOUT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    if request.param == "tree":
        built = _pip_wheel(src, tmp / "dist")
    else:
        r = subprocess.run([sys.executable, "-c", "import sys; from setuptools.build_meta import build_sdist; "
                            "print(build_sdist(sys.argv[1]))", str(tmp / "sdist")],
                           cwd=src, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        built = _pip_wheel(tmp / "sdist" / r.stdout.split()[-1], tmp / "dist")
    with zipfile.ZipFile(built) as zf:
        yield zf


def test_every_package_and_module_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    modules = _source_modules()
    packages = {m.removesuffix("/__init__.py").replace("/", ".") for m in modules if m.endswith("/__init__.py")}
    assert {"sls_deploy", "sls_deploy.upscale", "sls_deploy.adaptive"} <= packages
    missing = sorted(p for p in packages if p.replace(".", "/") + "/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel: {missing}"
    assert sorted(modules - names) == []
    assert sorted(n for n in names if n.endswith(".py") and n not in modules) == []  # nothing stale either


def test_recipes_calibration_images_and_weights_are_in_the_wheel_byte_for_byte(wheel):
    names = set(wheel.namelist())
    for folder, patterns in DATA.items():
        files = sorted(p for pattern in patterns for p in (CHECKOUT / "sls_deploy" / folder).glob(pattern))
        assert files, f"no {patterns} in sls_deploy/{folder}"
        for path in files:
            member = f"sls_deploy/{folder}/{path.name}"
            assert member in names, f"{member} is not in the wheel"
            assert wheel.read(member) == path.read_bytes(), member


def test_wheel_holds_only_the_package_and_its_console_script(wheel):
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {"sls_deploy", next(n for n in names if ".dist-info/" in n)
                                                .split("/")[0]}
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "sls-deploy = sls_deploy.cli:main" in wheel.read(entry_points).decode()
