"""Precision written into the ONNX graph itself (TensorRT 11 is strongly typed; TensorRT 10 accepts the same):
an FP16 graph with FP32 islands (Cast nodes at their borders) and an explicit-quantization INT8 graph (Q/DQ)."""

from sls_deploy.onnx.precision.fp16 import to_fp16
from sls_deploy.onnx.precision.int8 import calibrate, quantize_int8

__all__ = ["calibrate", "quantize_int8", "to_fp16"]
