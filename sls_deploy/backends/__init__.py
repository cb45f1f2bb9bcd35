"""PyTorch / ONNX Runtime / TensorRT runners behind one interface (Polygraphy's), the clip/step driver, latency."""
