"""Generic ONNX export, graph checks and inspection, and precision rewriting (FP16 islands, INT8 Q/DQ)."""
