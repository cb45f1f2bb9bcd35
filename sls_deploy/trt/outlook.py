"""Predicted TensorRT benefit of a plan's 2:4 layers: a labelled prediction, never a measurement.

Rules (research notes §6): sparse tactics exist for FP16/INT8 only, so a layer kept at FP32 (an island) never
gets one; NVIDIA reports gains mostly from ~256 channels up, with 64-channel SR layers borderline; TensorRT
times sparse against dense tactics at the profile's opt shape and keeps the faster. The bound is the model's
MAC ratio with every 2:4 layer counted as halved (what a perfect 2x sparse kernel on each would give).
"""

from __future__ import annotations

PREDICTION_LABEL = ("prediction from published TensorRT behaviour, not a measurement: build the engine on the "
                    "target and read engine/layers.json for what TensorRT picked")


def layer_outlook(weight_shape: list[int], precision: str, sparse_2to4: bool) -> tuple[str, str]:
    """(likely | borderline | unlikely | no, why) for one layer."""
    if not sparse_2to4:
        return "no", "weights are not 2:4"
    if precision == "fp32":
        return "no", "kept FP32 (an island): TensorRT has sparse tactics for FP16/INT8 only"
    width = min(weight_shape[0], weight_shape[1])
    if width >= 256:
        return "likely", f"{width}+ channels: sparse tactics usually win at this width"
    if width >= 64:
        return "borderline", f"{width} channels: sparse and dense tactics are close; TensorRT times both"
    return "unlikely", f"only {width} channels: dense tactics usually win"


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
            "counts": {k: sum(r["outlook"] == k for r in rows) for k in ("likely", "borderline", "unlikely", "no")}}
