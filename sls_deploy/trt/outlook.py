"""Predicted TensorRT benefit of a plan's 2:4 layers: a labelled prediction, never a measurement.

The per-layer rule ("likely" / "unlikely" / "no", with its NVIDIA sources) lives with the target cost model
(``sls_deploy.pruning.target.layer_outlook``), so the budget and this outlook never disagree. The bound is the
model's MAC ratio with every 2:4 layer counted as halved (what a perfect 2x sparse kernel on each would give),
and a second bound halving only the "likely" ones.
"""

from __future__ import annotations

from sls_deploy.pruning.target import OUTLOOKS, WIDE, layer_outlook

__all__ = ["OUTLOOKS", "PREDICTION_LABEL", "WIDE", "layer_outlook", "predicted_benefit"]

PREDICTION_LABEL = ("prediction from published TensorRT behaviour, not a measurement: build the engine on the "
                    "target and read engine/layers.json for what TensorRT picked")


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
