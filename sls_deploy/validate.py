"""Backends behind one interface, and the comparison of a backend against the PyTorch reference.

Backends follow Polygraphy's runner style: ONNX Runtime runs through Polygraphy's ``OnnxrtRunner`` and
``SessionFromOnnx`` loaders, so the TensorRT runner (engine stage) drops in beside it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .data.images import load_pair
from .errors import ValidationError


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


@contextlib.contextmanager
def ort_infer(onnx_path: str | os.PathLike, input_name: str = "lr", output_name: str = "sr") -> Iterator:
    """An ``infer(lr_tensor) -> np.ndarray`` function backed by ONNX Runtime on CPU (via Polygraphy)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    quiet_polygraphy()
    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX file not found: {path}")
    inputs = onnx_inputs(path)
    if input_name not in inputs:
        raise ValidationError(f"{path.name} has no input '{input_name}' (inputs: {', '.join(inputs) or 'none'})")
    dtype = inputs[input_name]
    with OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])) as runner:

        def infer(lr: torch.Tensor) -> np.ndarray:
            out = runner.infer({input_name: lr.detach().cpu().numpy().astype(dtype)})[output_name]
            return np.asarray(out, dtype=np.float32)

        yield infer


@dataclass
class SizeCheck:
    size: tuple[int, int]  # LR (H, W)
    max_abs: float
    mean_abs: float
    output_shape: tuple[int, ...]


def crops_for_sizes(files: Sequence[Path], scale: int, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """One LR input per size: a centre crop of an eval image (cycling through the list)."""
    out = []
    for i, (h, w) in enumerate(sizes):
        _, lr = load_pair(files[i % len(files)], scale)
        H, W = lr.shape[-2:]
        if H < h or W < w:
            raise ValidationError(f"eval image {Path(files[i % len(files)]).name} ({W}x{H} LR) is smaller than "
                                  f"the check size {w}x{h}")
        y, x = (H - h) // 2, (W - w) // 2
        out.append(lr[:, :, y:y + h, x:x + w].contiguous())
    return out


def _as_array(out) -> np.ndarray:
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def compare_to_reference(reference, backend, inputs: Sequence[torch.Tensor]) -> list[SizeCheck]:
    """Run both on each input; max and mean absolute difference of the outputs."""
    checks = []
    for x in inputs:
        with torch.no_grad():
            ref = _as_array(reference(x))
            got = _as_array(backend(x))
        if got.shape != ref.shape:
            raise ValidationError(f"backend output shape {got.shape} differs from PyTorch's {ref.shape} "
                                  f"for input {tuple(x.shape)}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        checks.append(SizeCheck(size=(int(x.shape[-2]), int(x.shape[-1])), max_abs=float(diff.max()),
                                mean_abs=float(diff.mean()), output_shape=tuple(got.shape)))
    return checks
