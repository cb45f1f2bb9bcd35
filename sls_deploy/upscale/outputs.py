"""Where `upscale` may write, decided before the first output is written and checked again before each one.

An output never goes onto one of the inputs, never into a bundle (a folder with an sls-deploy manifest, at any
depth above the output), and never over a folder, device, fifo, socket or a link to one: --force changes none of
that. An existing file upscale did not write is replaced only with --force.

"Did not write" is decided by ``.sls-upscale.json`` in the output folder: it lists every output upscale wrote
there with its sha256. A re-run (of the same command, or any upscale into that folder) replaces a listed file
without --force while it is unchanged since; a file edited since, or any other file, needs --force.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sls_deploy.core import atomic
from sls_deploy.core.bundle import enclosing_bundle
from sls_deploy.core.errors import DataError, SlsError, UsageError
from sls_deploy.core.safe_json import load_json

OWNED = ".sls-upscale.json"  # {"outputs": {name: sha256}} of the files upscale wrote into its folder
OWNED_MAX_BYTES = 4 * 2**20


def _stat(path: Path, follow: bool) -> os.stat_result | None:
    """os.stat/lstat, None when nothing is there; a one-line error for a path that cannot be looked at."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def _check_out_dir(out_dir: Path) -> None:
    st = _stat(out_dir, follow=True)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"output folder {out_dir} is {atomic.file_kind(st.st_mode)}; give a folder (created if "
                         "missing)")
    inside = enclosing_bundle(out_dir)
    if inside is not None:
        where = "is a bundle" if inside == out_dir.resolve() else f"is inside the bundle {inside}"
        raise UsageError(f"output folder {out_dir} {where}: upscale never writes into a bundle; choose another -o "
                         "folder")
    for parent in out_dir.absolute().parents:  # the folder will be created under its nearest existing parent
        pst = _stat(parent, follow=True)
        if pst is not None:
            if not stat.S_ISDIR(pst.st_mode):
                raise UsageError(f"cannot create output folder {out_dir}: {parent} is not a folder")
            break


def _read_owned(path: Path) -> dict[str, str]:
    """The outputs recorded as upscale's; an unreadable record counts as none (those files then need --force)."""
    st = _stat(path, follow=False)
    if st is None:
        return {}
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file: upscale keeps the list of the outputs it wrote there; "
                        "remove it or choose another -o folder")
    if st.st_size > OWNED_MAX_BYTES:
        return {}
    try:
        outputs = load_json(path, "upscale record", DataError, OWNED_MAX_BYTES).get("outputs", {})
    except (SlsError, AttributeError):
        return {}
    if not isinstance(outputs, dict):
        return {}
    return {k: v for k, v in outputs.items() if isinstance(k, str) and isinstance(v, str)}


@dataclass
class Outputs:
    """The output folder of one upscale run: ``check`` each output path before writing it, ``record`` it after."""

    out_dir: Path
    force: bool
    inputs: dict[tuple[int, int], Path]  # (device, inode) of every input -> its path
    owned: dict[str, str] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)  # folders ``create`` made, deepest first

    @property
    def record_path(self) -> Path:
        return self.out_dir / OWNED

    def check(self, output: Path) -> str:
        """Whether ``output`` may be written: "new", "own" (an unchanged earlier output of upscale) or "force"
        (another file, replaced as --force asks). Raises a one-line error otherwise."""
        lst = _stat(output, follow=False)
        if lst is None:
            return "new"
        st = _stat(output, follow=True) if stat.S_ISLNK(lst.st_mode) else lst
        link = " (a link)" if stat.S_ISLNK(lst.st_mode) else ""
        if st is not None and (st.st_dev, st.st_ino) in self.inputs:
            raise UsageError(f"the output {output}{link} would overwrite the input {self.inputs[st.st_dev, st.st_ino]}: "
                             "upscale never writes onto its inputs; choose another -o folder")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise DataError(f"{output}{link} exists and is {atomic.file_kind(st.st_mode)}: upscale never replaces one, "
                            "--force or not; choose another -o folder")
        inside = enclosing_bundle(output) if link else None
        if inside is not None:
            raise UsageError(f"{output} is a link into the bundle {inside}: upscale never writes into a bundle; "
                             "choose another -o folder")
        if not link and output.name in self.owned and atomic.sha256_file(output) == self.owned[output.name]:
            return "own"
        if self.force:
            return "force"
        raise DataError(f"{output} exists and is not an unchanged output of an earlier upscale; pass --force to "
                        "replace it, or choose another -o folder")

    def create(self) -> None:
        """Make the output folder (once every check passed) and remove what a killed upscale left in it (its
        temporary files, ``atomic.remove_stale_temps``)."""
        missing = []
        for d in (self.out_dir, *self.out_dir.absolute().parents):
            if _stat(d, follow=True) is not None:
                break
            missing.append(d)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create output folder {self.out_dir}: {e.strerror or e}") from None
        self.created = missing
        _read_owned(self.record_path)  # still a regular file (or none)
        atomic.remove_stale_temps(self.out_dir)

    def remove_if_unused(self) -> None:
        """Remove the folders ``create`` made that are still empty (a run that failed before its first output,
        on a full disk say, leaves nothing behind)."""
        for d in self.created:
            try:
                d.rmdir()
            except OSError:  # not empty (an output was written), or gone: kept as it is
                return

    def record(self, output: Path, sha256: str) -> None:
        """Note ``output`` (just written, with this sha256) as upscale's, so a re-run may replace it."""
        self.owned[output.name] = sha256
        _read_owned(self.record_path)
        try:
            atomic.write_json(self.record_path, {"written_by": "sls-deploy upscale", "outputs": self.owned})
        except OSError as e:
            raise DataError(f"cannot write {self.record_path}: {e.strerror or e}") from None


def plan(outputs: list[Path], sources: list[Path], out_dir: Path, force: bool) -> tuple[Outputs, dict[Path, str]]:
    """Check every output before anything is written; returns the folder's ``Outputs`` and each output's verdict
    ("new", "own", "force")."""
    _check_out_dir(out_dir)
    inputs = {}
    for src in sources:
        st = os.stat(src)
        inputs[st.st_dev, st.st_ino] = src
    folder = Outputs(out_dir, force, inputs)
    if _stat(out_dir, follow=True) is not None:
        folder.owned = _read_owned(folder.record_path)
    return folder, {out: folder.check(out) for out in outputs}
