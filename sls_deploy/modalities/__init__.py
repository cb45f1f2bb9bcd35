"""modalities."""
