"""Latency of models side by side: warm-up, then timed runs interleaved so that both see the same machine load.

Times are wall-clock per call of an ``infer`` function on one fixed input. The report gives medians and p90s
and, above all, the ratio pruned / dense measured in the same run, since absolute times depend on the machine.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

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


@functools.lru_cache(maxsize=None)
def _register_shared_arena() -> None:
    """One CPU arena for every latency session of the process, grown by what is asked (not in powers of two)."""
    import onnxruntime as ort

    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg(0, 1, -1, -1))  # no limit, kSameAsRequested, default chunk sizes


def ort_session(path: str | os.PathLike, threads: int | None = None, device=None):
    """An ONNX Runtime session (``providers_for(device)``: the CUDA provider on a CUDA device when installed) with
    an explicit intra-op thread count (recorded in reports).

    Timed sessions keep an arena (buffers reused from run to run, as a deployed session's), but one CPU arena shared
    by the sessions timed side by side and no memory pattern: two sessions with their own arenas and patterns kept
    ~1.7 GB resident for EDSR-baseline at 180x320 (dense + pruned), one shared arena ~0.6 GB."""
    import onnxruntime as ort

    from sls_deploy.backends.providers import session

    _register_shared_arena()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.use_env_allocators", "1")
    return session(path, device, so), so.intra_op_num_threads


def ort_call(sess, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: sess.run(None, feed)


def release_shared_arena(sessions: Iterable, feed: dict[str, np.ndarray]) -> None:
    """Hand the shared arena's memory back once the timing is done: one untimed run of each session on a small
    ``feed`` with ONNX Runtime's arena shrinkage, which frees every arena region nothing uses any more. The arena
    outlives the sessions (ONNX Runtime cannot unregister it), so without this the largest timed run's buffers
    (~0.6 GB for EDSR-baseline at 180x320) stay resident for the rest of the process."""
    import onnxruntime as ort

    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    for sess in sessions:
        sess.run(None, feed, shrink)
