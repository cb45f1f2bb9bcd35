"""The artifact folder ("bundle") a build writes, and its manifest.

The manifest records tool and library versions, the command line, the build key (recipe, budget, method, M),
and for every stage the digest of its inputs and the sha256 of each file it wrote. A stage whose inputs
digest matches and whose outputs are intact is skipped on a re-run, so an interrupted build resumes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from sls_deploy import __version__
from sls_deploy.core import atomic
from sls_deploy.core.errors import BundleError
from sls_deploy.core.safe_json import load_json

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
PLAN = "plan.json"
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRAPH_FILES = {"fp32": ONNX, "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}  # one graph per precision
MASKS = "masks.safetensors"  # masks that do not follow from weights + plan (imported ones), kept as they are
WORK = "work"  # resumable training checkpoints live here, outside the final artifact names
STAGES = ("search", "finetune", "export", "validate")  # each stage reads what the ones before it wrote
LOCK = ".sls-deploy.lock"  # held (flock) by the one process writing the folder
_HELD: dict[str, int] = {}  # folder -> lock file descriptor, for the rest of this process


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "numpy", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Bundle:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def lock(self) -> None:
        """Hold this folder's write lock for the rest of the process (the folder is created if needed); a second
        writer gets "folder busy ... (pid N)". Released by the OS when the process ends, however it ends."""
        import fcntl

        key = str(self.root.resolve())
        if key in _HELD:
            return
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(f"{self.root} exists and is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise BundleError(f"cannot write the bundle folder {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BundleError(f"folder busy: another sls-deploy process (pid {pid}) is writing {self.root}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise (atomic.disk_full_error(e, self.root / LOCK, check_free=False)
                   or BundleError(f"cannot write the bundle folder {self.root}: {e.strerror}")) from None
        _HELD[key] = fd
        atomic.remove_stale_temps(self.root, recursive=True)  # a killed writer's; no other writer holds the lock

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def work(self) -> Path:
        return self.root / WORK

    # -- manifest -------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path(MANIFEST)
        if not p.is_file():
            return {}
        m = load_json(p, "manifest")
        if not isinstance(m, dict) or not isinstance(m.get("stages", {}), dict):
            raise BundleError(f"{p} is not an sls-deploy manifest (a JSON object with stages); choose another --out")
        return m

    def _write_manifest(self, m: Mapping[str, Any]) -> None:
        m = dict(m)
        m["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        recipe_sha = m.get("files", {}).get(RECIPE)  # as `claim` wrote it, never re-read: a later edit shows
        m["files"] = {name: atomic.sha256_file(self.path(name))
                      for name in sorted({f for s in m.get("stages", {}).values() for f in s["outputs"]})
                      if self.path(name).is_file()}
        if recipe_sha:
            m["files"][RECIPE] = recipe_sha
        atomic.write_json(self.path(MANIFEST), m)

    def check_claimable(self, build_key: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse (writing nothing) a folder that is a file, holds a different build, or holds other content;
        return its manifest ({} for a new or empty folder)."""
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(f"{self.root} exists and is not a folder")
        m = self.manifest()
        if m:
            old = m.get("build_key", {})
            if old != dict(build_key):
                what = ", ".join(f"{k}={old.get(k)}" for k in ("model", "budget", "method", "m"))
                raise BundleError(f"{self.root} holds another bundle ({what}); choose another --out or remove it")
        elif self.root.is_dir() and any(p.name != LOCK for p in self.root.iterdir()):
            raise BundleError(f"{self.root} is not empty and holds no sls-deploy bundle; choose another --out")
        return m

    def claim(self, build_key: Mapping[str, Any], recipe_text: str, options: Mapping[str, Any] | None = None) -> None:
        """Make this folder the bundle of ``build_key``; refuse a folder that holds a different build."""
        m = self.check_claimable(build_key)
        self.root.mkdir(parents=True, exist_ok=True)
        if not m:
            m = {"tool": "sls-deploy", "version": __version__, "build_key": dict(build_key),
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "stages": {}}
        m["libraries"] = library_versions()
        m["command"] = sys.argv
        if options is not None:
            m["options"] = dict(options)
        atomic.write_text(self.path(RECIPE), recipe_text)
        m["files"] = {**m.get("files", {}), RECIPE: atomic.sha256_file(self.path(RECIPE))}
        m.setdefault("stages", {})
        self._write_manifest(m)

    def require(self) -> dict[str, Any]:
        m = self.manifest()
        if not self.root.is_dir():
            raise BundleError(f"bundle not found: {self.root}")
        if not m:
            raise BundleError(f"{self.root} is not a bundle (no {MANIFEST})")
        return m

    # -- stages ---------------------------------------------------------------------------------------
    def stage_is_current(self, stage: str, inputs_digest: str) -> bool:
        rec = self.manifest().get("stages", {}).get(stage)
        if not rec or rec.get("inputs") != inputs_digest:
            return False
        return all(self.path(f).is_file() and atomic.sha256_file(self.path(f)) == h
                   for f, h in rec["outputs"].items())

    def record_stage(self, stage: str, inputs_digest: str, outputs: list[str], seconds: float,
                     info: Mapping[str, Any] | None = None) -> None:
        """Record a stage that just ran. The stages after it (``STAGES``) read what it wrote, so their records go:
        they are no longer current (``invalidated`` says by which stage) until they run again."""
        m = self.require()
        stages = m.setdefault("stages", {})
        stages[stage] = {
            "inputs": inputs_digest, "seconds": round(seconds, 2),
            "outputs": {f: atomic.sha256_file(self.path(f)) for f in outputs}, **(dict(info) if info else {})}
        invalidated = {k: v for k, v in m.get("invalidated", {}).items() if k != stage}
        later = STAGES[STAGES.index(stage) + 1:] if stage in STAGES else ()
        for name in later:
            if stages.pop(name, None) is not None:
                invalidated[name] = stage
        m["invalidated"] = invalidated
        if not invalidated:
            del m["invalidated"]
        self._write_manifest(m)

    def stage_missing(self, stage: str) -> str | None:
        """Why ``stage`` has no current record (None: it has one): "never ran" or "<stage> ran after it"."""
        m = self.require()
        if stage in m.get("stages", {}):
            return None
        by = m.get("invalidated", {}).get(stage)
        return f"{by} ran after it" if by else "never ran"

    def recorded_file(self, stage: str, key: str, fallback: str | None = None) -> Path:
        """A weights file a stage recorded under ``key`` (else ``fallback``): one that stage wrote is found in this
        bundle, wherever the bundle was built from or moved to since; any other as recorded. One-line
        BundleError when the stage or the file is missing."""
        rec = self.require().get("stages", {}).get(stage)
        value = (rec or {}).get(key) or (rec or {}).get(fallback or key)
        if not value:
            raise BundleError(f"bundle {self.root}: its {stage} stage recorded no {key} (run build again)")
        path = Path(value)
        if path.name in rec.get("outputs", {}):
            return self.path(path.name)
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: the {key.replace('_', ' ')} its {stage} stage used, {path}, "
                              "are missing (moved or deleted?)")
        return path

    def verify(self, names: list[str]) -> None:
        """Every named file exists and matches the sha256 the manifest recorded for it."""
        files = self.require().get("files", {})
        if RECIPE in names and RECIPE not in files and self.path(RECIPE).is_file():
            raise BundleError(f"bundle {self.root} was written by an older sls-deploy that did not record the "
                              f"sha256 of {RECIPE}; run the build command that made it again to record it "
                              "(finished stages are skipped)")
        verify_recorded(self.root, files, names, f"bundle {self.root}", "the manifest")


def verify_recorded(root: Path, recorded: Mapping[str, str], names, where: str, record: str,
                    unrecorded: str = "") -> None:
    """Each named file under ``root`` exists and matches its sha256 in ``recorded`` (``record`` names the file
    that lists them, ``where`` the folder, in messages; ``unrecorded`` adds the remedy for a file not listed).
    One-line BundleError otherwise. Bundles (manifest.json) and families (family.json) are checked this way."""
    for name in names:
        p = root / name
        if not p.is_file():
            raise BundleError(f"{where} lacks {name}")
        want = recorded.get(name)
        if want is None:
            raise BundleError(f"{where}: {name} is not recorded in {record}" + (f" ({unrecorded})" if unrecorded else ""))
        if atomic.sha256_file(p) != want:
            raise BundleError(f"{where}: {name} was changed after it was written (sha256 mismatch)")


def enclosing_bundle(path: str | Path) -> Path | None:
    """The bundle folder that ``path`` is or lies in (links followed), or None. A bundle folder holds a manifest.json
    and the recipe.yaml or the write lock every bundle gets when it is claimed (so a web folder's manifest.json is
    not taken for one)."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        try:
            if (d / MANIFEST).is_file() and ((d / RECIPE).is_file() or os.path.lexists(d / LOCK)):
                return d
        except OSError:  # a folder we may not look into is no bundle we could write either
            continue
    return None
