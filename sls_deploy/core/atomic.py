"""Atomic artifact writes: write to a temporary file beside the target, then rename over it.

A crash or Ctrl-C therefore never leaves a half-written file under a final name. Also here, for every writer:

- ``refuse_non_regular``: an output path that is a device, fifo, socket (or a link to one) or a folder is never
  replaced, ``--force`` or not (``train --out /dev/null --force`` once replaced the device node with a file).
- A full disk (or spent quota) is one line, ``DiskFullError: no space left on <folder>``, whatever library was
  writing (an ``OSError`` from Python, a ``RuntimeError`` from ``torch.save``), and the temporary file is removed.
- Temporary names carry the writer's host and pid: ``.<name>.<host>-<pid>.<random>.tmp``, for files
  (``atomic_path``) and for folders that take their final name whole (``temp_dir``: an unpacked tar). A process
  killed mid-write (SIGKILL, power loss) leaves one behind; ``remove_stale_temps`` (run when a bundle folder is
  locked, before an unpack, an upscale, and on the folders of other outputs) removes those whose process no longer
  runs on this machine, and those of another machine or of the names earlier versions used once they are an hour
  old. Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from sls_deploy.core.errors import BundleError, DiskFullError, SlsError

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # names hold no dots or odd characters
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
# names earlier versions gave their temporaries, without the host: (pattern, what follows the final name, a folder),
# stale once STALE_AGE_S old. mkstemp files, an unpack's staging folder, upscale's video (".clip.<pid>.tmp.mp4")
_LEGACY = ((re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$"), "", False),
           (re.compile(r"^\.(?P<name>.+)\.unpack-[A-Za-z0-9_]{8}$"), "", True),
           (re.compile(r"^\.(?P<name>.+)\.\d+\.tmp\.mp4$"), ".mp4", False))
STALE_AGE_S = 3600  # a temp file of another machine, or of the old naming, is stale after this long
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
_NEARLY_FULL = 1 << 20  # bytes free after a failed write below which the failure was the disk filling up


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a link"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: "a regular file", "a fifo", "a character device", "a folder", ..."""
    return next((k for test, k in _KINDS if test(mode)), "not a regular file")


def refuse_non_regular(path: str | os.PathLike, what: str = "output") -> None:
    """Raise BundleError unless ``path`` is absent, a regular file, or a link to one (or a dangling link).

    For every ``--out``/``--force``/``-o`` target and inside ``atomic_path``: a device node, fifo, socket or
    folder (or a link to one) is never replaced by a file."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: a link to /dev/sda is a block device here
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise BundleError(f"cannot write {what} {path}: {e.strerror or e}") from None
    if stat.S_ISREG(st.st_mode):
        return
    via = " (through a link)" if path.is_symlink() else ""
    raise BundleError(f"{what} {path} is {file_kind(st.st_mode)}{via}, not a regular file: it is never replaced "
                      "(choose a file name)")


def disk_full_error(e: BaseException, final: str | os.PathLike, check_free: bool = True) -> DiskFullError | None:
    """The one-line DiskFullError for a write of ``final`` that failed with ``e``, or None if the disk is not
    the cause. ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    ... file write failed`` with no errno, so for an error without one (and ``check_free``: the write had begun in
    ``final``'s folder) the free space is looked at: a write that failed with less than 1 MiB left (its own
    partial file still counted) ran out of space. A one-line SlsError that a writer raised from such an error
    (``ExportError: torch.onnx.export failed: [Errno 28] ...``) becomes this one too."""
    if isinstance(e, SlsError):  # a writer's own one-line error: converted only if it wraps a stated full disk
        e, check_free = e.__cause__ or e.__context__, False
    if not isinstance(e, Exception) or isinstance(e, SlsError):
        return None
    final = Path(final)
    full = (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(t in str(e) for t in _FULL_TEXTS)
    if not full and check_free and isinstance(e, (OSError, RuntimeError)):
        with contextlib.suppress(OSError):
            st = os.statvfs(final.parent)
            full = st.f_bavail * st.f_frsize < _NEARLY_FULL
    if not full:
        return None
    return DiskFullError(f"no space left on {final.parent}: {final.name} was not written (no partial file "
                         "is kept; free some space and run the same command again)")


def temp_name(final: str | os.PathLike) -> str:
    """The prefix of this process's temporary files for ``final`` (``remove_stale_temps`` knows it)."""
    return f".{Path(final).name}.{_HOST}-{os.getpid()}."


def temp_dir(final: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside ``final``, named as ``atomic_path``'s files are, for a folder that
    takes ``final``'s name whole (``os.replace``) once complete; the caller removes it otherwise."""
    final = Path(final)
    return Path(tempfile.mkdtemp(prefix=temp_name(final), suffix=".tmp", dir=final.parent))


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to ``final`` only if the block succeeds.

    A non-regular ``final`` is refused before anything is written; a full disk is a DiskFullError; the
    temporary file never outlives the block."""
    final = Path(final)
    refuse_non_regular(final)
    tmp_path = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name(final), suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp makes 0600, and writers that recreate the file (safetensors) keep their own mode: every
        # artifact gets the usual permissions under the user's umask, as any other file they write
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, final)
    except Exception as e:
        full = disk_full_error(e, final, check_free=tmp_path is not None)  # the partial file still counts
        if full is None:
            raise
        raise full from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: running, as another user
        return True
    return True


def _stale(name: str, st: os.stat_result, names: set[str] | None) -> bool:
    """Whether the entry ``name`` (its lstat ``st``) is a temporary of a writer that is gone (see the module doc)."""
    m = _TEMP.match(name)
    if m:
        if names is not None and m["name"] not in names:
            return False
        return not _pid_running(int(m["pid"])) if m["host"] == _HOST else time.time() - st.st_mtime > STALE_AGE_S
    for pattern, suffix, folder in _LEGACY:
        old = pattern.match(name)
        if old and folder == stat.S_ISDIR(st.st_mode):
            return (names is None or old["name"] + suffix in names) and time.time() - st.st_mtime > STALE_AGE_S
    return False


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False,
                       names: set[str] | None = None) -> list[Path]:
    """Remove the temporary files and folders (``atomic_path``, ``temp_dir``, and the names of earlier versions)
    left in ``folder`` (and below, if ``recursive``) when their process was killed mid-write; ``names``: only those
    of these final names. Only this module's naming is touched, and only entries whose writer is gone: its pid no
    longer runs here, or (another machine's, or the pid-less names of earlier versions) the entry is over
    STALE_AGE_S old. Links are never followed or removed. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in list(folder.rglob(".*") if recursive else folder.glob(".*")):
        try:
            st = os.lstat(p)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or not _stale(p.name, st, names):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:  # removed meanwhile (or inside a folder removed just before)
            continue
    return removed


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
