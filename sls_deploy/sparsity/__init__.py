"""N:M sparsity: masks and checks, MAC counting, plans and planners. Knows nothing of any architecture."""

from .masking import MaskSet
from .nm import VALID_M, eligible, guarantees_2to4, is_2to4, is_nm, max_nonzeros_per_group, nm_mask
from .plan import DenseLayer, LayerPlan, Plan

__all__ = ["DenseLayer", "LayerPlan", "MaskSet", "Plan", "VALID_M", "eligible", "guarantees_2to4", "is_2to4",
           "is_nm", "max_nonzeros_per_group", "nm_mask"]
