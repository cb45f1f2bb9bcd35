"""N:M sparsity: masks and checks, plans and planners. Knows nothing of any architecture."""

from sls_deploy.pruning.nm.masking import MaskSet
from sls_deploy.pruning.nm.patterns import (VALID_M, eligible, guarantees_2to4, is_2to4, is_nm,
                                            max_nonzeros_per_group, nm_mask)
from sls_deploy.pruning.nm.plan import DenseLayer, LayerPlan, Plan

__all__ = ["DenseLayer", "LayerPlan", "MaskSet", "Plan", "VALID_M", "eligible", "guarantees_2to4", "is_2to4",
           "is_nm", "max_nonzeros_per_group", "nm_mask"]
