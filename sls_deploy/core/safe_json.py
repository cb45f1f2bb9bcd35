"""The one JSON reader for files this tool did not just produce in memory: bounded in size and nesting.

``json.loads`` reads a file of any size and recurses once per nesting level: a 200 KB ``[[[[...]]]]`` in a
bundle's plan.json raised ``RecursionError`` (a traceback), and a 50 MB manifest.json was read whole before
anything looked at it. ``load_json`` checks the file's kind and size before reading (``bounded.read_capped``),
then the bracket depth outside strings (``bytes.translate`` and a running sum in numpy: no recursion, no
per-character Python loop), and only then parses. Every failure is one line of the caller's error type naming the
file. Manifests, plans, reports, family and adaptive files, kept-units files, calibration caches and pack.json
are read through here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sls_deploy.core.bounded import read_capped
from sls_deploy.core.errors import BundleError, SlsError

MAX_BYTES = 16 << 20  # 16 MiB: the largest file read this way (a paper-size model's plan) is a few hundred KB
MAX_DEPTH = 64  # nested objects/arrays (the deepest file written, a report, nests 6)
_KEEP = bytes(c for c in range(256) if c not in b'"[]{}')  # what bytes.translate deletes


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in ``data``, brackets inside strings not counted (an unterminated
    string's brackets are: the parser refuses that file anyway). The escapes that matter are dropped first
    (``\\\\`` pairs, left to right as the parser reads them, then ``\\"``), then everything but quotes and brackets
    (``bytes.translate``), then every other quote-delimited stretch: the strings."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(data.translate(None, _KEEP).split(b'"')[0::2])
    if not brackets:
        return 0
    import numpy as np

    a = np.frombuffer(brackets, np.uint8)
    steps = ((a == ord("[")) | (a == ord("{"))).view(np.int8) * np.int8(2) - np.int8(1)  # +1 opens, -1 closes
    return max(0, int(np.cumsum(steps, dtype=np.int32).max()))


def parse_json(data: bytes, where: str, what: str, error: type[SlsError] = BundleError) -> Any:
    """The JSON value in ``data`` (UTF-8), or one-line ``error`` "``where`` is not a valid ``what`` (why)"."""
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise error(f"{where} is not a valid {what} (nested {depth} levels deep; at most {MAX_DEPTH})")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where} is not a valid {what} (not UTF-8 text: byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not a valid {what} ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (RecursionError, ValueError) as e:  # not reached below MAX_DEPTH; a number too long to convert
        raise error(f"{where} is not a valid {what} ({type(e).__name__})") from None


def load_json(path: str | os.PathLike, what: str, error: type[SlsError] = BundleError,
              max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value in the file ``path`` (``what`` names it: "manifest", "plan", ...), or one-line ``error``:
    missing or unreadable, not a regular file, over ``max_bytes``, nested over MAX_DEPTH, or not JSON."""
    data = read_capped(path, what, error, max_bytes, "not a file sls-deploy wrote")
    return parse_json(data, str(path), what, error)
