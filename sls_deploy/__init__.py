"""sls-deploy: search a per-layer N:M sparsity plan, finetune, export sparse ONNX, build TensorRT engines."""

__version__ = "0.1.0"
