"""Strict reading of numbers from recipes and plans: integral where a count is meant, finite, in range.

``int(4.9)`` silently gives 4 and ``float("nan")`` passes ``> 0`` checks; these helpers refuse both with a
one-line error naming the field."""

from __future__ import annotations

import math
from typing import Any

from sls_deploy.core.errors import RecipeError, short_repr

# caps shared by recipes and the command line, so that neither accepts what the other refuses
MAX_STEPS = 10**7  # training / search steps (at ~10 steps/s that is 11 days)
MAX_COUNT = 10**7  # other counts (round_to, grow_every, checkpoint_every, ...)
MAX_SIDE = 8192  # an LR height or width the recipe asks to run (validate sizes, engine profile)
MAX_LATENCY_RUNS = 10_000  # timed runs per model and size
MAX_WORKSPACE_MB = 1 << 20  # TensorRT workspace: 1 TiB


def as_int(value: Any, what: str, lo: int | None = None, hi: int | None = None, error=RecipeError) -> int:
    """An integer (``4`` or ``4.0``; not ``4.9``, ``True`` or ``"4"``) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise error(f"{what} must be an integer, not {short_repr(value)}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise error(f"{what} must be in {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}, "
                    f"not {short_repr(v)}")
    return v


def as_float(value: Any, what: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             error=RecipeError) -> float:
    """A finite number within [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise error(f"{what} must be a finite number, not {short_repr(value)}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise error(f"{what} must be {'>' if lo_open else '>='} {lo:g}, not {v:g}")
    if hi is not None and v > hi:
        raise error(f"{what} must be <= {hi:g}, not {v:g}")
    return v
