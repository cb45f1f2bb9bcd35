"""Channel (structured) pruning of the channel groups an adapter declares: importance, selection, slicing, the plan."""
