"""Predicted TensorRT benefit of a plan's 2:4 layers: a labelled prediction, never a measurement.

What TensorRT does with 2:4 weights (research notes §6):

- NVIDIA TensorRT developer guide, "Structured Sparsity": with ``BuilderFlag.SPARSE_WEIGHTS`` set, a layer whose
  weights follow 2:4 is *eligible*; TensorRT then times sparse against dense tactics at the profile's opt shape
  and keeps the faster one. Sparse tactics exist for FP16/INT8 only, so a layer kept at FP32 (an island) never
  gets one.
- NVIDIA/TensorRT GitHub issues #3849 and #4065 (answers by NVIDIA staff): sparse kernels pay off from about
  256 input *and* output channels; below that the dense tactic usually wins.
- NVIDIA/TensorRT GitHub issue #1403: a 64->64 3x3 convolution was eligible for sparse math and not picked.
- 1x1 convolutions and Linear/Gemm layers are rarely given a sparse tactic (research notes §6).

So the outlook of a layer is "likely" (a 3x3-or-larger conv with >= 256 in and out channels), "unlikely" (any
narrower conv, e.g. the 64-channel SR layers, and every 1x1 conv or Linear/Gemm layer) or "no" (not 2:4, or kept
FP32). The bound is the model's MAC ratio with every 2:4 layer counted as halved (what a perfect 2x sparse
kernel on each would give), and a second bound halving only the "likely" ones.
"""

from __future__ import annotations

from typing import Sequence

PREDICTION_LABEL = ("prediction from published TensorRT behaviour, not a measurement: build the engine on the "
                    "target and read engine/layers.json for what TensorRT picked")

OUTLOOKS = ("likely", "unlikely", "no")
WIDE = 256  # in and out channels from which sparse tactics usually win (TensorRT issues #3849, #4065)


def layer_outlook(weight_shape: Sequence[int], precision: str, sparse_2to4: bool) -> tuple[str, str]:
    """(likely | unlikely | no, why) for one layer; ``weight_shape`` is a conv's [out, in, kh, kw] or a Linear/Gemm
    layer's [out, in]."""
    if not sparse_2to4:
        return "no", "weights are not 2:4"
    if precision == "fp32":
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


def predicted_benefit(plan_layers: list[dict], macs_dense_total: float) -> dict:
    """Per-layer outlook and two bounds: every 2:4 layer halved, and only the 'likely' ones halved."""
    rows, saved_all, saved_likely = [], 0.0, 0.0
    for l in plan_layers:
        outlook, why = layer_outlook(l["weight_shape"], l.get("precision", "fp16/int8"), l["sparse_2to4"])
        rows.append({"name": l["name"], "outlook": outlook, "why": why})
        if l["sparse_2to4"]:  # a 2:4 kernel does the layer's dense MACs at half the cost
            saved_all += l["macs_dense"] / 2
            if outlook == "likely":
                saved_likely += l["macs_dense"] / 2
    total = macs_dense_total
    return {"label": PREDICTION_LABEL, "layers": rows,
            "bound_all_2to4_halved": (total - saved_all) / total if total else None,
            "bound_likely_halved": (total - saved_likely) / total if total else None,
            "counts": {k: sum(r["outlook"] == k for r in rows) for k in OUTLOOKS}}
