"""Whether TensorRT is here: the one check every TensorRT path (engine builds, ``validate --backend trt``,
``upscale --backend trt``) makes before it reads or writes anything."""

from __future__ import annotations

from sls_deploy.core.errors import BackendMissingError

TRT_HINT = ("TensorRT was not found (import tensorrt failed): on x86 install it with "
            "pip install 'sls-deploy[tensorrt]' (NVIDIA's wheels), on Jetson it comes with JetPack")


def require_tensorrt():
    """The tensorrt module, or a one-line BackendMissingError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendMissingError(TRT_HINT) from None
    return tensorrt


def tensorrt_major() -> int | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return int(str(tensorrt.__version__).split(".")[0])
