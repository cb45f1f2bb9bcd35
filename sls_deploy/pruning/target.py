"""What a pruned layer costs on the backend it is built for (``--target``): the budget's unit.

One sentence (``TARGET_HELP``, also in ``--help`` and the report): the budget is the pruned model's cost as a
fraction of the dense model's, counted on the target — ``trt``: removed channels save, and a 2:4 layer counts
half where TensorRT is expected to pick a sparse kernel for it; ``ort`` (any dense backend): only removed
channels save; ``none``: MACs with an N:M layer at N/M (the SLS paper's metric, for research).

A layer's cost on a target (``layer_cost``), from its MACs after channel slicing and its N of M:

- ``none``: MACs * N / M;
- ``ort``: MACs (a dense backend runs N:M weights at full cost);
- ``trt``: MACs / 2 if TensorRT is expected to accelerate it (``trt_accelerates``: M = 4 and N <= 2, i.e. the
  weights follow 2:4; built in FP16 or INT8, never an FP32 island; outlook "likely"), else MACs. A 1:4 layer
  costs what 2:4 costs (TensorRT runs it with the 2:4 kernel) and a 3:4 layer costs what dense costs.

When TensorRT picks a sparse tactic (``layer_outlook``), from published NVIDIA material:

- NVIDIA TensorRT developer guide, "Structured Sparsity": with ``SPARSE_WEIGHTS`` set a layer whose weights
  follow 2:4 is *eligible*; TensorRT times sparse against dense tactics and keeps the faster. Sparse tactics
  exist for FP16/INT8 only.
- NVIDIA/TensorRT GitHub issues #3849 and #4065 (answers by NVIDIA staff): sparse kernels pay off from about
  256 input *and* output channels; below that the dense tactic usually wins.
- NVIDIA/TensorRT GitHub issue #1403: a 64->64 3x3 convolution was eligible for sparse math and not picked.
- 1x1 convolutions and Linear/Gemm layers are rarely given a sparse tactic (research notes §6).

So a layer is "likely" (a 3x3-or-larger conv with >= 256 in and out channels), "unlikely" (every narrower conv,
e.g. the 64-channel SR layers, and every 1x1 conv or Linear/Gemm) or "no" (not 2:4, or kept FP32). These are
predictions, never measurements: the engine's build log says what TensorRT picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sls_deploy.core.vocabulary import TARGETS

TARGET_HELP = ("The budget is the pruned model's cost as a fraction of the dense model's, counted on the target: "
               "trt (default) counts removed channels, and a 2:4 layer at half where TensorRT is expected to pick "
               "a sparse kernel (FP16/INT8, >= 256 channels in and out, 3x3); ort (any dense backend) counts only "
               "removed channels; none counts MACs with an N:M layer at N/M (the SLS paper's metric).")
TARGET_NAMES = {"trt": "TensorRT (predicted 2:4 acceleration)", "ort": "a dense backend (ONNX Runtime)",
                "none": "MACs with N:M at N/M (SLS paper)"}

OUTLOOKS = ("likely", "unlikely", "no")
WIDE = 256  # in and out channels from which sparse tactics usually win (TensorRT issues #3849, #4065)
PRECISION_FP32 = "fp32"


def layer_outlook(weight_shape: Sequence[int], precision: str, sparse_2to4: bool) -> tuple[str, str]:
    """(likely | unlikely | no, why) for one layer; ``weight_shape`` is a conv's [out, in, kh, kw] or a Linear/Gemm
    layer's [out, in]; ``precision`` the layer's precision in the deployed graphs ("fp32" for an island)."""
    if not sparse_2to4:
        return "no", "weights are not 2:4"
    if precision == PRECISION_FP32:
        return "no", "kept FP32 (an island): TensorRT has sparse tactics for FP16/INT8 only"
    out_ch, in_ch = int(weight_shape[0]), int(weight_shape[1])
    if len(weight_shape) == 2:
        return "unlikely", "Linear/Gemm layer: TensorRT rarely picks a sparse tactic for these"
    if all(int(k) == 1 for k in weight_shape[2:]):
        return "unlikely", "1x1 conv: TensorRT rarely picks a sparse tactic for these"
    if min(in_ch, out_ch) >= WIDE:
        return "likely", f"{in_ch}->{out_ch} channels (>= {WIDE} in and out): sparse tactics usually win here"
    return "unlikely", (f"{in_ch}->{out_ch} channels (< {WIDE} in or out): dense tactics usually win; TensorRT "
                        "times both and may keep the dense one (issue #1403: a 64->64 3x3 conv eligible, not picked)")


def is_2to4(n: int, m: int) -> bool:
    """N:M weights that TensorRT's 2:4 kernels run: M = 4 and N <= 2 (1:4 runs as 2:4)."""
    return m == 4 and n <= 2


def trt_accelerates(weight_shape: Sequence[int], precision: str, n: int, m: int) -> bool:
    """TensorRT is expected to run this layer on a 2:4 sparse kernel (the outlook is "likely")."""
    return layer_outlook(weight_shape, precision, is_2to4(n, m))[0] == "likely"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, not '{target}'")
    return target


def layer_cost(target: str, macs: float, n: int, m: int, weight_shape: Sequence[int], precision: str) -> float:
    """The layer's cost on ``target`` (in MACs): see the module docstring."""
    check_target(target)
    if n >= m:
        return float(macs)
    if target == "none":
        return macs * n / m
    if target == "trt" and trt_accelerates(weight_shape, precision, n, m):
        return macs / 2
    return float(macs)


def n_cost_fractions(target: str, m: int, weight_shape: Sequence[int], precision: str) -> tuple[float, ...]:
    """Cost of N = 1..M as a fraction of the layer's dense cost on ``target``."""
    return tuple(layer_cost(target, 1.0, n, m, weight_shape, precision) for n in range(1, m + 1))


def can_save(target: str, m: int, weight_shape: Sequence[int], precision: str) -> bool:
    """Some N < M makes this layer cheaper than dense on ``target``."""
    return min(n_cost_fractions(target, m, weight_shape, precision)) < 1.0


@dataclass(frozen=True)
class CostedLayer:
    """A layer as the target sees it: MACs after slicing, N of M (N = M: dense), shape and precision."""

    name: str
    macs: float
    n: int
    m: int
    weight_shape: tuple[int, ...]
    precision: str

    def cost(self, target: str) -> float:
        return layer_cost(target, self.macs, self.n, self.m, self.weight_shape, self.precision)


def target_ratio(target: str, layers: Sequence[CostedLayer], dense_total: float) -> float:
    """Whole-model cost on ``target`` as a fraction of the dense model's ``dense_total`` MACs."""
    return sum(l.cost(target) for l in layers) / dense_total if dense_total else 1.0
