"""Pruning strategies: N:M masks on weights (nm/) and channel removal (channels/), with MAC counting.

Knows nothing of any architecture: model knowledge comes from the adapter's declarations."""
