"""The TensorRT engine stage on Polygraphy: settings and profiles, the per-layer report, the labelled outlook."""
