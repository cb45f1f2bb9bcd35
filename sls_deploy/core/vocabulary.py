"""Names the command line, the recipe, the settings and the pruning strategies share, defined once.

Plain constants (no torch, no other sls_deploy import): ``cli.py`` imports them while ``--help`` stays fast, and
``config/`` checks recipes and settings against them without importing ``pruning/``.
"""

from __future__ import annotations

# -- pruning methods, strategy families, selections, targets ------------------------------------------------
# Every method here has one strategy in pruning/ (``pruning.registry.STRATEGIES``; tests/test_strategies.py
# checks that the two agree). The groups below say what a method does, so that a check reads the group, never
# the method's name.
NM_METHODS = ("sls", "oneshot", "srste")  # masks on weights, the dense architecture kept
CHANNEL_METHODS = ("ssl", "l1", "l1-global", "hybrid")  # hybrid: ssl channels, then 2:4 where the target gains
METHODS = NM_METHODS + CHANNEL_METHODS  # what --method and the recipe's method keys accept
IMPORTED_NM = "imported"  # N:M masks searched elsewhere (`import-sls`)
IMPORTED_CHANNELS = "imported-channels"  # a channel plan made elsewhere (`import-pruned`)
FAMILY_OF = {**{m: "nm" for m in NM_METHODS + (IMPORTED_NM,)},
             **{m: "channels" for m in CHANNEL_METHODS + (IMPORTED_CHANNELS,)}}
FAMILIES = ("nm", "channels")
# options that mean something for one family only: given for the other, they are usage errors naming them
FAMILY_OPTIONS = {"nm": ("m", "n", "lam", "alpha"), "channels": ("round_to", "keep_full", "selection", "units")}
SLS_SEARCH = ("sls",)  # search by training SLS gates: --lam/--alpha apply, N is chosen per layer (no --n)
LEARNED_SCALES = ("ssl", "hybrid")  # learn per-unit scales by training before selection: --selection applies
WITH_NM_PART = ("hybrid",)  # a channel plan with a 2:4 part (no given units, no nested family)
UNIFORM_WIDTHS = ("l1",)  # the same kept fraction in every group
SELECTIONS = ("normalised", "raw", "fisher", "taylor")  # how ssl/hybrid choose the kept widths (``--selection``)
DEFAULT_SELECTION = "normalised"
TARGETS = ("trt", "ort", "none")  # what the budget is counted on (pruning/target.py)
DEFAULT_TARGET = "trt"

# --------------------------------------------------------------------------- precisions, calibration, backends
# (the runtime's vocabulary: which graphs a bundle holds, how INT8 is calibrated, what runs them)

PRECISIONS = ("fp32", "fp16", "int8")  # model.onnx, model.fp16.onnx, model.int8.onnx (core/bundle.py GRAPH_FILES)
IO_DTYPES = ("fp32", "fp16")  # input/output dtype of the FP16 graph
CALIB_METHODS = ("max", "percentile", "entropy")  # INT8 activation calibration (onnx/precision/int8.py)
DEFAULT_CALIB_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99

ORT, TORCH, TRT = "ort", "torch", "trt"  # ONNX Runtime, the PyTorch weights, a TensorRT engine
BACKENDS = (ORT, TORCH, TRT)
