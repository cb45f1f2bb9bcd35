"""Reading a file the user could have replaced by anything: a regular file only, its size capped before reading.

A fifo in place of a file would block the reader forever and a device (``/dev/zero``) never ends; a file of
gigabytes costs its size in memory before any parser could refuse it. ``read_capped`` opens without blocking,
checks the kind and size on the open descriptor (what is checked is what is read) and reads at most the cap, so a
file that grows meanwhile is still bounded. The YAML and JSON readers (``safe_yaml``, ``safe_json``) read
through here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sls_deploy.core.errors import SlsError


def size_text(n: int) -> str:
    """``n`` bytes for a message: "1 MiB", "16 MiB", "512 KiB"."""
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"


def read_capped(path: str | os.PathLike, what: str, error: type[SlsError], max_bytes: int,
                usual: str = "") -> bytes:
    """The bytes of ``path`` (``what`` names it in messages), or one-line ``error``: not found or unreadable, not
    a regular file, or larger than ``max_bytes`` (``usual``, e.g. "a recipe is a few KB", says why that is
    plenty)."""
    path = Path(path)
    too_large = f"{what} {path} is larger than {size_text(max_bytes)}" + (f" ({usual})" if usual else "")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{what} {path} is not a regular file")
            if st.st_size > max_bytes:
                raise error(too_large)
            data = f.read(max_bytes + 1)  # a file that grows after the check is still bounded
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise error(too_large)
    return data
