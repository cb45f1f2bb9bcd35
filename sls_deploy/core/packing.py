"""Rollout bundles: `sls-deploy pack` makes a tar with only what a device needs, `engine`/`validate` accept it.

The tar holds the graphs, plan, recipe, manifest, calibration cache and a small validation set (the eval
images), plus pack.json: tool, ONNX, opset and recipe versions and the sha256 of every packed file. Unpacking
checks every hash, so a bundle altered after packing is refused.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from sls_deploy import __version__
from sls_deploy.core import atomic
from sls_deploy.core.errors import BundleError

PACK_MANIFEST = "pack.json"
VAL_DIR = "val"
_PACKED = ("manifest.json", "recipe.yaml", "plan.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx",
           "calib_cache.json", "report.json")


def is_pack(path: Path) -> bool:
    """True for a tar this tool packed (it holds pack.json): the only kind of existing file ``pack`` replaces."""
    try:
        with tarfile.open(path, "r:*") as tar:
            return PACK_MANIFEST in tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return False


def pack(bundle_root: Path, out: Path, eval_files: list[Path], opset: int, recipe_digest: str,
         force: bool = False) -> Path:
    if out.is_dir():
        raise BundleError(f"{out} is a folder; give --out a file name (e.g. {bundle_root.name}.tar.gz)")
    if out.exists() and not force and not is_pack(out):
        raise BundleError(f"{out} exists and is not a packed bundle; choose another --out or pass --force")
    files = {name: bundle_root / name for name in _PACKED if (bundle_root / name).is_file()}
    if "model.onnx" not in files or "plan.json" not in files:
        raise BundleError(f"{bundle_root} has no exported graph yet (run `sls-deploy export` first)")
    for f in eval_files:
        files[f"{VAL_DIR}/{f.name}"] = f
    import onnx

    meta = {"tool": "sls-deploy", "version": __version__, "onnx": onnx.__version__, "opset": opset,
            "recipe_digest": recipe_digest, "files": {k: atomic.sha256_file(v) for k, v in files.items()}}
    with atomic.atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(meta, indent=2).encode()
            info = tarfile.TarInfo(PACK_MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for name, path in sorted(files.items()):
                tar.add(path, arcname=name)
    return out


def unpack(tar_path: Path, dest: Path | None = None) -> Path:
    """Extract next to the tar (``<name>/``) and check every file against pack.json; return the folder.

    Nothing already there is deleted or overwritten: the tar is extracted into a new folder beside ``dest`` and
    checked (every hash, no member that pack.json does not list) before it takes ``dest``'s name. A ``dest``
    that already holds this very pack (same pack.json, every file intact) is reused, so an engine built into it
    stays; any other existing ``dest`` is refused."""
    if not tar_path.is_file():
        raise BundleError(f"bundle not found: {tar_path}")
    dest = dest or tar_path.with_name(tar_path.name.split(".tar")[0])
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        try:
            with tarfile.open(tar_path, "r:*") as tar:
                members = tar.getmembers()
                for m in members:  # no absolute paths, no '..', no links
                    if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                        raise BundleError(f"{tar_path}: refusing suspicious member '{m.name}'")
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"cannot read {tar_path} as a packed bundle: {e}") from None
        meta = verify_packed(staging)
        listed = set(meta["files"]) | {PACK_MANIFEST}
        extra = sorted(str(f.relative_to(staging)) for f in staging.rglob("*")
                       if f.is_file() and str(f.relative_to(staging)) not in listed)
        if extra:
            raise BundleError(f"{tar_path}: member '{extra[0]}' is not listed in {PACK_MANIFEST} (refused)")
        if dest.exists():
            if _same_pack(dest, staging / PACK_MANIFEST):
                return dest
            raise BundleError(f"{dest} exists and is not this tar's unpacked bundle; move it away (nothing was "
                              "changed) or unpack elsewhere")
        os.replace(staging, dest)
        return dest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _same_pack(folder: Path, meta_path: Path) -> bool:
    """``folder`` is an intact unpacked copy of the pack whose pack.json is ``meta_path``."""
    try:
        if not (folder / PACK_MANIFEST).is_file() or (folder / PACK_MANIFEST).read_bytes() != meta_path.read_bytes():
            return False
        verify_packed(folder)
        return True
    except (BundleError, OSError):
        return False


def verify_packed(root: Path) -> dict:
    meta_path = root / PACK_MANIFEST
    if not meta_path.is_file():
        raise BundleError(f"{root} has no {PACK_MANIFEST}")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise BundleError(f"{meta_path} is not a valid {PACK_MANIFEST} ({type(e).__name__}: {e})") from None
    for name, sha in files.items():
        p = root / name
        if not p.is_file():
            raise BundleError(f"packed bundle lacks {name}")
        if atomic.sha256_file(p) != sha:
            raise BundleError(f"packed bundle: {name} does not match its recorded sha256 (altered after packing)")
    return meta
