"""Rollout bundles: `sls-deploy pack` makes a tar with only what a device needs, `engine`/`validate` accept it.

The tar holds the graphs, plan, recipe, manifest, calibration cache and a small validation set (the eval
images), plus pack.json: tool, ONNX, opset and recipe versions and the sha256 of every packed file. Unpacking
checks every hash, so a bundle altered after packing is refused.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from sls_deploy import __version__
from sls_deploy.core import atomic
from sls_deploy.core.errors import BundleError

PACK_MANIFEST = "pack.json"
VAL_DIR = "val"
_PACKED = ("manifest.json", "recipe.yaml", "plan.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx",
           "calib_cache.json", "report.json")


def pack(bundle_root: Path, out: Path, eval_files: list[Path], opset: int, recipe_digest: str) -> Path:
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
    """Extract next to the tar (``<name>/``) and check every file against pack.json; return the folder."""
    if not tar_path.is_file():
        raise BundleError(f"bundle not found: {tar_path}")
    dest = dest or tar_path.with_name(tar_path.name.split(".tar")[0])
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:  # no absolute paths, no '..', no links
                if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    raise BundleError(f"{tar_path}: refusing suspicious member '{m.name}'")
            if dest.exists():
                shutil.rmtree(dest)
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"cannot read {tar_path} as a packed bundle: {e}") from None
    verify_packed(dest)
    return dest


def verify_packed(root: Path) -> dict:
    meta_path = root / PACK_MANIFEST
    if not meta_path.is_file():
        raise BundleError(f"{root} has no {PACK_MANIFEST}")
    meta = json.loads(meta_path.read_text())
    for name, sha in meta["files"].items():
        p = root / name
        if not p.is_file():
            raise BundleError(f"packed bundle lacks {name}")
        if atomic.sha256_file(p) != sha:
            raise BundleError(f"packed bundle: {name} does not match its recorded sha256 (altered after packing)")
    return meta
