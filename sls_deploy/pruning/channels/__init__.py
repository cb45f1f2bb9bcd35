"""pruning/channels."""
