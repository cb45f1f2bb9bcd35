"""Infrastructure every stage shares: typed errors, atomic writes, the bundle and its manifest, safe checkpoints, torchrun helpers, rollout packing."""
