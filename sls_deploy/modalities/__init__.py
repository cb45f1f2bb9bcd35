"""How data meets the model (image, clip, step): data resolution, samplers, losses, evaluation."""
