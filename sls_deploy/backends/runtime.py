"""The runtime layer: a bundle's graph (any precision) or engine opened for a backend, as a runner.

It follows Polygraphy's loaders and runners. A loader is a small callable that opens one thing when it is called
(``GraphFromBundle``: a bundle's graph of a precision, checked to be there; ``EngineFromBundle``: its TensorRT
engine; ``SessionFromGraph``: an ONNX Runtime session of a graph, sessions.py's). Runners (Polygraphy's
``OnnxrtRunner`` and ``TrtRunner``) take a loader and share one interface (a context manager, ``infer(feed)``,
``get_input_metadata()``), which ``backends.drive`` drives for image, clip and step graphs alike:

- ``onnx_runner(path, device)``: ONNX Runtime on ``providers_for(device)`` (the CPU by default);
- ``trt_runner(path)``: a serialized TensorRT engine (TensorRT required: a one-line BackendMissingError without);
- ``open_runner(root, backend, precision, device)``: a bundle's graph (``ort``) or engine (``trt``) in one call;
- ``ort_infer``: an ``infer(lr) -> sr`` function on a graph (the accuracy checks);
- the PyTorch reference (``torch``) is ``backends.loading``'s ``bundle_module`` / ``load_model``.

Every ONNX Runtime session opens in ``backends.sessions``; this is the one module that builds Polygraphy runners.
A missing or unreadable graph or engine is a one-line typed error (BundleError, ValidationError).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from sls_deploy.core.bundle import GRAPH_FILES
from sls_deploy.core.errors import BundleError, UsageError, ValidationError
from sls_deploy.core.vocabulary import ORT, PRECISIONS, TRT

ENGINE_FILE = "engine/model.plan"
SHRINK, TILES = "shrink", "tiles"  # SessionFromGraph's memory settings (sessions.py)


def quiet_polygraphy() -> None:
    """Polygraphy logs every session it creates; keep its warnings and errors only."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


def onnx_inputs(path: Path) -> dict[str, type]:
    """{input name: numpy dtype} of a graph's real inputs (FP16-I/O graphs take float16)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise ValidationError(f"cannot read {path} as ONNX (corrupt?): {type(e).__name__}") from None
    inits = {t.name for t in graph.initializer}
    return {i.name: np.float16 if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
            for i in graph.input if i.name not in inits}


# --------------------------------------------------------------------------- loaders


class GraphFromBundle:
    """Loader: the path of a bundle's graph of ``precision`` (model.onnx, model.fp16.onnx, model.int8.onnx), or a
    one-line BundleError saying how to export it."""

    def __init__(self, root: str | os.PathLike, precision: str):
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
        self.root, self.precision = Path(root), precision

    def __call__(self) -> Path:
        graph = self.root / GRAPH_FILES[self.precision]
        if not graph.is_file():
            raise BundleError(f"{self.root} has no {GRAPH_FILES[self.precision]} (export it with `sls-deploy export "
                              f"{self.root} --precision {self.precision}`)")
        return graph


class EngineFromBundle:
    """Loader: the path of a bundle's TensorRT engine, or a one-line BundleError saying how to build it."""

    def __init__(self, root: str | os.PathLike, name: str = ENGINE_FILE):
        self.root, self.name = Path(root), name

    def __call__(self) -> Path:
        engine = self.root / self.name
        if not engine.is_file():
            raise BundleError(f"{self.root} has no {self.name} (build it with `sls-deploy engine {self.root}`)")
        return engine


class SessionFromGraph:
    """Loader: an ONNX Runtime session of a graph on ``providers_for(device)``. ``memory``: ``shrink`` (the
    checks' ShrinkingSession, its arena handed back after every run) or ``tiles`` (no CPU arena: `upscale`)."""

    def __init__(self, path: str | os.PathLike, device=None, memory: str = SHRINK):
        self.path, self.device, self.memory = Path(path), device, memory

    def __call__(self):
        from sls_deploy.backends import sessions

        if self.memory == TILES:
            return sessions.tile_session(self.path, self.device)
        return sessions.ShrinkingSession(self.path, self.device)


# --------------------------------------------------------------------------- runners


def onnx_runner(onnx_path: str | os.PathLike, device=None, memory: str = SHRINK):
    """An (inactive) Polygraphy ``OnnxrtRunner`` (``providers_for(device)``; the CPU by default): the FP32
    reference of the TensorRT checks, and the stand-in for ``TrtRunner`` where there is no TensorRT. Drive it
    with ``backends.drive``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    quiet_polygraphy()
    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX file not found: {path}")
    onnx_inputs(path)  # a corrupt file is a one-line ValidationError here, not a traceback at activate()
    return OnnxrtRunner(SessionFromGraph(path, device, memory))


def trt_runner(engine):
    """An (inactive) Polygraphy ``TrtRunner`` on a serialized engine: a path, or a loader that gives one
    (``EngineFromBundle``, called after the TensorRT check). TensorRT required (a one-line BackendMissingError)."""
    from sls_deploy.backends.tensorrt import require_tensorrt

    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    path = engine() if callable(engine) else engine
    return TrtRunner(EngineFromBytes(BytesFromPath(str(path))))


def open_runner(root: str | os.PathLike, backend: str, precision: str, input_name: str, device=None):
    """A bundle's graph of ``precision`` (``ort``, on ``providers_for(device)``, no CPU arena) or its engine
    (``trt``) as an inactive runner, and the dtype its input ``input_name`` takes: (runner, numpy dtype)."""
    if backend == ORT:
        graph = GraphFromBundle(root, precision)()
        quiet_polygraphy()
        dtype = onnx_inputs(graph)[input_name]
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(SessionFromGraph(graph, device, TILES)()), dtype
    if backend == TRT:
        return trt_runner(EngineFromBundle(root)), np.float32
    raise UsageError(f"open_runner opens ort or trt, not '{backend}'")


@contextlib.contextmanager
def ort_infer(onnx_path: str | os.PathLike, input_name: str = "lr", output_name: str = "sr",
              device=None) -> Iterator:
    """An ``infer(lr_tensor) -> np.ndarray`` function backed by ONNX Runtime (via Polygraphy), on
    ``providers_for(device)``: the CPU unless the device is a GPU and onnxruntime-gpu is installed."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    quiet_polygraphy()
    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX file not found: {path}")
    inputs = onnx_inputs(path)
    if input_name not in inputs:
        raise ValidationError(f"{path.name} has no input '{input_name}' (inputs: {', '.join(inputs) or 'none'})")
    dtype = inputs[input_name]
    with OnnxrtRunner(SessionFromGraph(path, device)) as runner:

        def infer(lr) -> np.ndarray:
            out = runner.infer({input_name: lr.detach().cpu().numpy().astype(dtype)})[output_name]
            return np.asarray(out, dtype=np.float32)

        yield infer
