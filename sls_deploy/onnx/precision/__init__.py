"""Precision written into the ONNX graph itself (TensorRT 11 is strongly typed; TensorRT 10 accepts the same):
an FP16 graph with FP32 islands (Cast nodes at their borders) and an explicit-quantization INT8 graph (Q/DQ).

Islands are conv layers by name (``islands``) and ONNX op types (``island_ops``, the adapter's
``fp32_island_ops()``: for a video model GridSample, whose sampling grid and the flow arithmetic behind it stay
FP32). Single-input image graphs and multi-input video graphs (a clip graph, a recurrent step graph) alike."""

from sls_deploy.onnx.precision.fp16 import to_fp16
from sls_deploy.onnx.precision.int8 import (calibrate, calibrate_feeds, quantize_int8, quantized_inputs,
                                            video_calibration_feeds)

__all__ = ["calibrate", "calibrate_feeds", "quantize_int8", "quantized_inputs", "to_fp16", "video_calibration_feeds"]
