"""Rollout bundles: `sls-deploy pack` makes a tar with only what a device needs, `engine`/`validate` accept it.

The tar holds the graphs, plan, recipe, manifest, calibration cache and a small validation set (the eval
images), plus pack.json: tool, ONNX, opset and recipe versions and the sha256 of every packed file. Unpacking
checks every hash, so a bundle altered after packing is refused.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from sls_deploy import __version__
from sls_deploy.core import atomic
from sls_deploy.core.bounded import read_capped
from sls_deploy.core.bundle import enclosing_bundle
from sls_deploy.core.errors import BundleError, UsageError
from sls_deploy.core.safe_json import parse_json

PACK_MANIFEST = "pack.json"
PACK_SUFFIXES = (".tar.gz", ".tgz", ".tar")  # what `engine` / `validate` unpack, and `pack` writes (.tar.gz)
MAX_UNPACKED = 4 * 2**30  # bytes a pack may unpack to (its members' declared sizes), checked before extraction
MAX_PACK_MANIFEST = 2**20
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


def packed_names(bundle_root: Path) -> list[str]:
    """The bundle files `pack` puts in the tar (those of _PACKED the bundle has)."""
    return [name for name in _PACKED if (bundle_root / name).is_file()]


def check_pack_out(bundle_root: Path, out: Path, force: bool = False) -> None:
    """Where ``pack`` may write: never inside a bundle (this one or another: ``enclosing_bundle``, links
    followed), never over a folder, a device or another non-regular file (``atomic.refuse_non_regular``), over
    another existing file only if it is an earlier pack (or with ``force``)."""
    inside = enclosing_bundle(out)
    if inside is not None:
        raise UsageError(f"--out {out} is inside the bundle {inside}; write the tar outside it "
                         f"(default {bundle_root.name}.tar.gz beside it)")
    atomic.refuse_non_regular(out, "--out")
    if out.exists() and not force and not is_pack(out):
        raise BundleError(f"{out} exists and is not a packed bundle; choose another --out or pass --force")


def is_packed(path: Path) -> bool:
    """A packed bundle: a file (a tar from `pack`, checked as it is unpacked) or a folder holding pack.json."""
    return path.is_file() or (path / PACK_MANIFEST).is_file()


def pack(bundle_root: Path, out: Path, eval_files: list[Path], opset: int, recipe_digest: str,
         force: bool = False) -> Path:
    """The tar of ``bundle_root``'s packed files (checked by the caller) and ``eval_files`` under val/."""
    check_pack_out(bundle_root, out, force)
    files = {name: bundle_root / name for name in packed_names(bundle_root)}
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


def unpacked_name(tar_path: Path) -> str:
    """The folder a packed tar unpacks to: its name less .tar.gz, .tgz or .tar (one-line BundleError otherwise)."""
    name = tar_path.name
    suffix = next((s for s in PACK_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise BundleError(f"{tar_path} is not a packed bundle: give a bundle folder or a {', '.join(PACK_SUFFIXES)} "
                          "file made by `sls-deploy pack`")
    stem = name[: -len(suffix)]
    if stem in ("", ".", ".."):
        raise BundleError(f"{tar_path}: a packed bundle unpacks to a folder named after it (edsr.tar.gz -> edsr/), "
                          f"and '{name}' names none; rename it")
    return stem


def unpack(tar_path: Path, dest: Path | None = None) -> Path:
    """Extract next to the tar (``<name>/``) and check every file against pack.json; return the folder.

    The member list is checked first, from the tar's headers, before anything is extracted: pack.json must list
    every regular file (no links, devices, absolute or '..' paths, no name twice) and the declared sizes must add
    up to at most MAX_UNPACKED. Nothing already there is deleted or overwritten: the tar is extracted into a new
    folder beside ``dest`` (``atomic.temp_dir``: a run killed meanwhile leaves one that the next unpack removes)
    and every hash checked before it takes ``dest``'s name. A ``dest`` that already holds this very pack (same
    pack.json, every file intact) is reused, so an engine built into it stays; any other existing ``dest`` is
    refused. A full disk is one line, "no space left on ...", and leaves nothing behind."""
    if not tar_path.is_file():
        raise BundleError(f"bundle not found: {tar_path}")
    dest = dest or tar_path.with_name(unpacked_name(tar_path))
    staging = None
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members, meta_bytes = _checked_members(tar_path, tar)
            if dest.exists():
                if _same_pack(dest, meta_bytes):
                    return dest
                raise BundleError(f"{dest} exists and is not this tar's unpacked bundle; move it away (nothing was "
                                  "changed) or unpack elsewhere")
            atomic.remove_stale_temps(dest.parent, names={dest.name})
            staging = atomic.temp_dir(dest)
            tar.extractall(staging, members=members, filter="data")
            verify_packed(staging)
            os.replace(staging, dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        full = atomic.disk_full_error(e, dest, check_free=staging is not None)
        if full is not None:
            raise full from None
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
            raise BundleError(f"cannot unpack {tar_path}: {e.strerror or e}") from None
        raise BundleError(f"cannot read {tar_path} as a packed bundle: {e}") from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)
    return dest


def _checked_members(tar_path: Path, tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], bytes]:
    """The tar's members, each checked from its header as it is read (pack.json, which `pack` writes first, is
    read from the tar before any other member is looked at), and pack.json's bytes; nothing is written."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    listed: dict | None = None
    meta_bytes = b""
    total = 0

    def check(m: tarfile.TarInfo) -> None:
        if m.isdir():
            if not any(f.startswith(m.name.rstrip("/") + "/") for f in listed):
                raise BundleError(f"{tar_path}: folder '{_short(m.name)}' holds no file that {PACK_MANIFEST} lists "
                                  "(refused)")
        elif m.name not in listed and m.name != PACK_MANIFEST:
            raise BundleError(f"{tar_path}: member '{_short(m.name)}' is not listed in {PACK_MANIFEST} (refused, "
                              "nothing was extracted)")

    for m in tar:  # one header at a time: a bad member is refused before the next header is even read
        if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
            raise BundleError(f"{tar_path}: refusing suspicious member '{_short(m.name)}' (a link, device, absolute "
                              "or '..' path)")
        if m.name in seen:
            raise BundleError(f"{tar_path}: member '{_short(m.name)}' appears twice (refused)")
        total += m.size if m.isfile() else 0
        if total > MAX_UNPACKED:
            raise BundleError(f"{tar_path}: its members would unpack to more than {MAX_UNPACKED / 2**30:g} GiB "
                              f"(at '{_short(m.name)}'); refused, nothing was extracted")
        if m.name == PACK_MANIFEST:
            if m.size > MAX_PACK_MANIFEST:
                raise BundleError(f"{tar_path}: its {PACK_MANIFEST} is {m.size} bytes (at most {MAX_PACK_MANIFEST})")
            meta_bytes = tar.extractfile(m).read()
            listed = parse_pack_manifest(meta_bytes, f"{tar_path}: {PACK_MANIFEST}")["files"]
            for earlier in members:
                check(earlier)
        elif listed is not None:
            check(m)
        members.append(m)
        seen.add(m.name)
    if listed is None:
        raise BundleError(f"{tar_path} holds no {PACK_MANIFEST}: not a bundle packed by `sls-deploy pack`")
    missing = sorted(set(listed) - {m.name for m in members if m.isfile()})  # also catches a listed folder
    if missing:
        raise BundleError(f"{tar_path} lacks '{_short(missing[0])}', which its {PACK_MANIFEST} lists")
    return members, meta_bytes


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _same_pack(folder: Path, meta: bytes) -> bool:
    """``folder`` is an intact unpacked copy of the pack whose pack.json is ``meta``."""
    try:
        if read_capped(folder / PACK_MANIFEST, PACK_MANIFEST, BundleError, MAX_PACK_MANIFEST) != meta:
            return False
        verify_packed(folder)
        return True
    except (BundleError, OSError):
        return False


def parse_pack_manifest(data: bytes, where: str) -> dict:
    """pack.json's content, its ``files`` a mapping of relative member paths (no absolute path, no '..', no empty
    or odd name) to sha256 strings; one-line BundleError otherwise. Nothing is read from disk here."""
    meta = parse_json(data, where, PACK_MANIFEST)
    try:
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (KeyError, TypeError) as e:
        raise BundleError(f"{where} is not a valid {PACK_MANIFEST} ({type(e).__name__}: {_short(str(e))})") from None
    for name, sha in files.items():
        parts = PurePosixPath(name).parts
        if (not parts or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts
                or not isinstance(sha, str)):
            raise BundleError(f"{where} lists '{_short(name)}', not a relative path inside the bundle (refused, "
                              "nothing was read)")
    return meta


def read_pack_manifest(root: Path) -> dict:
    """An unpacked pack's pack.json, every member checked to be a path inside ``root`` (a symlink out of it is
    refused too) before any member is read."""
    meta_path = root / PACK_MANIFEST
    if not meta_path.is_file():
        raise BundleError(f"{root} has no {PACK_MANIFEST}")
    meta = parse_pack_manifest(read_capped(meta_path, PACK_MANIFEST, BundleError, MAX_PACK_MANIFEST), str(meta_path))
    inside = root.resolve()
    for name in meta["files"]:
        if not (root / name).resolve().is_relative_to(inside):
            raise BundleError(f"{meta_path} lists '{_short(name)}', which leads out of the bundle (a symbolic link; "
                              "refused, nothing was read)")
    return meta


def verify_packed(root: Path, names: list[str] | None = None) -> dict:
    """Each of ``names`` (default: every file pack.json lists) is listed, present and matches its sha256."""
    meta = read_pack_manifest(root)
    files = meta["files"]
    for name in files if names is None else names:
        p = root / name
        if name not in files:
            raise BundleError(f"packed bundle {root} lacks {name} (its {PACK_MANIFEST} does not list it)")
        if not p.is_file():
            raise BundleError(f"packed bundle {root} lacks {name}")
        if atomic.sha256_file(p) != files[name]:
            raise BundleError(f"packed bundle {root}: {name} does not match its recorded sha256 (altered after "
                              "packing)")
    return meta
