"""Reading an ONNX file with one-line errors, and onnx.checker's full check: used by export, ``inspect`` and the
checks a bundle's graphs get when opened (``core/opening.py``), so they live below all of them."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from sls_deploy.core.errors import ExportError


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise ExportError(f"{path} is empty (0 bytes), not an ONNX model")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise ExportError(f"cannot read {path} as ONNX (corrupt?): {str(e).splitlines()[0] if str(e) else e}") from None


def check_graph(path: str | os.PathLike) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects {Path(path).name}: {str(e).splitlines()[0]}") from None
