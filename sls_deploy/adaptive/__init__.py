"""Adaptive patch-wise inference over a family of pruned members (the SLS paper's adaptive inference, ClassSR /
ClassPruning routing): the family folder, the patch grid, the members as candidates, the routers that pick one
member per patch, and the evaluation at equal average MACs."""
