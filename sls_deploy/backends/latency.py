"""Latency of models side by side: warm-up, then timed runs interleaved so that both see the same machine load.

Times are wall-clock per call of an ``infer`` function on one fixed input. The report gives medians and p90s
and, above all, the ratio pruned / dense measured in the same run, since absolute times depend on the machine.
The timed ONNX Runtime sessions (one shared CPU arena) open in backends/sessions.py (``timed_session``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Timing:
    runs_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.runs_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.runs_ms, 90))

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "images_per_s": self.images_per_s,
                "runs": len(self.runs_ms)}


def time_side_by_side(calls: dict[str, Callable[[], object]], warmup: int, runs: int,
                      progress: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Each call ``warmup`` times, then ``runs`` rounds in which every call runs once (the order alternates
    between rounds so neither always runs first)."""
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            calls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        for n in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            calls[n]()
            times[n].append((time.perf_counter() - t0) * 1000.0)
        if progress:
            progress()
    return {n: Timing(t) for n, t in times.items()}


def ort_call(sess, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: sess.run(None, feed)
