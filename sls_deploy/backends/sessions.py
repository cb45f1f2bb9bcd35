"""Every ONNX Runtime session of the package opens here, one function per way it is used.

All of them run on ``providers_for(device)`` (backends/providers.py); they differ in their memory settings:

- ``cpu_session``: the CPU provider, ONNX Runtime's defaults. Export-time checks and INT8 calibration stay on the
  CPU on purpose: calibration ranges, and the graphs they give, must not depend on the machine.
- ``ShrinkingSession``: the accuracy checks' session, which hands its CPU arena back after every run.
- ``tile_session``: `upscale`'s session; no CPU arena (tiles of one size: it would only keep the peak).
- ``timed_session``: latency; one CPU arena shared by every timed session of the process, released after the
  timing by ``release_shared_arena``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import numpy as np

from sls_deploy.backends import providers


def session(model: str | os.PathLike | bytes, device: Any = None, options=None):
    """An ``onnxruntime.InferenceSession`` of a path or serialized model on ``providers_for(device)``."""
    import onnxruntime as ort

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=providers.providers_for(device))


def cpu_session(model: str | os.PathLike | bytes):
    """A session on the CPU provider with ONNX Runtime's default options."""
    return session(model)


class ShrinkingSession:
    """An ONNX Runtime session (``providers_for(device)``) that hands its CPU arena's memory back after every run.

    The checks run each graph at shapes up to the profile's maximum (EDSR: 270x480 LR, 1920x1080 out), one after
    another: a session's arena would keep the largest run's buffers (~0.7 GB each for EDSR-baseline) for as long
    as the session lives, and every graph's session is open at once. ONNX Runtime's own shrinkage
    (``memory.enable_memory_arena_shrinkage``) frees them at the end of each run; the session options, so the
    kernels and outputs, are those of Polygraphy's ``SessionFromOnnx``. Polygraphy's ``OnnxrtRunner`` takes it
    as its session (it calls ``run``, ``get_inputs`` and ``get_outputs``)."""

    def __init__(self, path: str | os.PathLike, device=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        try:  # the thread counts SessionFromOnnx sets
            so.intra_op_num_threads = so.inter_op_num_threads = len(os.sched_getaffinity(0))
        except AttributeError:  # no sched_getaffinity (not Linux)
            so.intra_op_num_threads = so.inter_op_num_threads = 1
        self.session = session(path, device, so)  # providers_for(device); the shrinkage below is the CPU arena's
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, feed, run_options=None):
        return self.session.run(output_names, feed, run_options or self.run_options)

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()


def tile_session(path: str | os.PathLike, device=None):
    """`upscale`'s session: no CPU memory arena (every tile has one size, so an arena would only keep the peak)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    return session(path, device, opts)


@functools.lru_cache(maxsize=None)
def _register_shared_arena() -> None:
    """One CPU arena for every latency session of the process, grown by what is asked (not in powers of two)."""
    import onnxruntime as ort

    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg(0, 1, -1, -1))  # no limit, kSameAsRequested, default chunk sizes


def timed_session(path: str | os.PathLike, threads: int | None = None, device=None):
    """A latency session (``providers_for(device)``: the CUDA provider on a CUDA device when installed) with an
    explicit intra-op thread count (recorded in reports): (session, threads).

    Timed sessions keep an arena (buffers reused from run to run, as a deployed session's), but one CPU arena shared
    by the sessions timed side by side and no memory pattern: two sessions with their own arenas and patterns kept
    ~1.7 GB resident for EDSR-baseline at 180x320 (dense + pruned), one shared arena ~0.6 GB."""
    import onnxruntime as ort

    _register_shared_arena()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.use_env_allocators", "1")
    return session(path, device, so), so.intra_op_num_threads


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
