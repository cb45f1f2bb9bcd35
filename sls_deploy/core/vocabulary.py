"""The package's vocabularies, each defined once and imported wherever it is needed.

Plain constants only (no torch, no onnx): the CLI imports this module at start-up to build its choices, so
``--help`` stays fast.
"""

# --------------------------------------------------------------------------- precisions, calibration, backends
# (the runtime's vocabulary: which graphs a bundle holds, how INT8 is calibrated, what runs them)

PRECISIONS = ("fp32", "fp16", "int8")  # model.onnx, model.fp16.onnx, model.int8.onnx (core/bundle.py GRAPH_FILES)
IO_DTYPES = ("fp32", "fp16")  # input/output dtype of the FP16 graph
CALIB_METHODS = ("max", "percentile", "entropy")  # INT8 activation calibration (onnx/precision/int8.py)
DEFAULT_CALIB_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99

ORT, TORCH, TRT = "ort", "torch", "trt"  # ONNX Runtime, the PyTorch weights, a TensorRT engine
BACKENDS = (ORT, TORCH, TRT)
