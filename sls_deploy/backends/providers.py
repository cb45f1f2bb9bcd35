"""Which ONNX Runtime execution providers a session gets: the one place that decides (sessions open in sessions.py).

``providers_for(device)``: the CUDA execution provider first when the device is a CUDA GPU and the installed
onnxruntime has it (the ``onnxruntime-gpu`` package), on that GPU; otherwise the CPU provider. Export-time checks,
INT8 calibration and quantization stay on the CPU on purpose (``CPU``): calibration ranges and the graphs they
give must not depend on the machine that built the bundle. ``describe(session)`` labels timings with what ran.
"""

from __future__ import annotations

from typing import Any

CPU: list = ["CPUExecutionProvider"]
CUDA_EP = "CUDAExecutionProvider"


def available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(device: Any = None) -> list:
    """ONNX Runtime providers for a torch device (or its text, "cpu", "cuda:1"); None means the CPU."""
    text = str(device) if device is not None else "cpu"
    if not text.startswith("cuda") or CUDA_EP not in available():
        return list(CPU)
    index = int(text.split(":", 1)[1]) if ":" in text else 0
    return [(CUDA_EP, {"device_id": index}), "CPUExecutionProvider"]


def describe(sess, device: Any = None) -> dict[str, str]:
    """{"provider": the session's first provider, "device": where it runs} for reports."""
    first = sess.get_providers()[0]
    where = str(device) if first == CUDA_EP and device is not None else "cpu"
    return {"provider": first, "device": where}
