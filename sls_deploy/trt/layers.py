"""Per-layer truth after an engine build: was each planned layer 2:4, eligible, and given a sparse tactic?

Sources: the plan (2:4 by construction), TensorRT's build log lines
``(Sparsity) Layers eligible for sparse math: A, B + C, ...`` and
``(Sparsity) TRT inference plan picked sparse implementation for layers: ...``, and the engine inspector JSON
(ProfilingVerbosity DETAILED: ``Layers[].Name``, ``HasSparseWeights``, ``TacticName``). TensorRT names fused
layers by joining ONNX node names with " + ", so a plan layer is matched through its Conv node's name.

Eligible and picked are different facts (research notes §6). A layer is *eligible* when the build log lists it
under "eligible for sparse math" or the inspector marks it ``HasSparseWeights`` (its weights follow 2:4, so
sparse tactics were timed). It was *picked* sparse only when the log lists it under "picked sparse
implementation" or its inspector tactic name is a sparse kernel: ``HasSparseWeights`` alone never counts as
picked, since TensorRT times sparse against dense tactics and may well keep the dense one (NVIDIA/TensorRT
issue #1403: a 64->64 3x3 conv eligible but not picked).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$", re.M)
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$", re.M)


def onnx_layer_nodes(onnx_path: str | Path) -> dict[str, str]:
    """{plan layer: ONNX Conv node name} (the layer's weight initializer is ``<layer>.weight``)."""
    import onnx

    from sls_deploy.onnx.export import graph_weights

    model = onnx.load(str(onnx_path))
    return {w.tensor[: -len(".weight")]: w.node for w in graph_weights(model) if w.tensor.endswith(".weight")}


def _names(pattern: re.Pattern, log: str) -> list[str]:
    """Every layer name listed on any matching log line (a build may print them more than once)."""
    return [n.strip() for m in pattern.finditer(log) for n in m.group(1).split(",") if n.strip()]


def _parts(fused: str) -> set[str]:
    """'A + B + PWN(C)' -> {'A', 'B', 'C', 'A + B + PWN(C)'}."""
    parts = {p.strip() for p in fused.split(" + ")}
    parts |= {m.group(1) for p in list(parts) if (m := re.match(r"^\w+\((.*)\)$", p))}
    return parts | {fused}


def _sparse_tactic(tactic: str) -> bool:
    """A sparse kernel's tactic name (e.g. ``sm86_xmma_fprop_sparse_conv_...``)."""
    return "sparse" in tactic.lower()


def layer_report(plan_layers: list[dict], nodes: dict[str, str], inspector: dict, build_log: str) -> list[dict]:
    """Per plan layer: 2:4 weights (the plan), TensorRT-eligible, sparse tactic picked, and why we say so.

    Plan layers of an N:M plan carry n/m/sparse_2to4; those of a channel (structured) plan do not and are
    reported as not 2:4.
    """
    eligible = set().union(*[_parts(n) for n in _names(_ELIGIBLE, build_log or "")])
    picked = set().union(*[_parts(n) for n in _names(_PICKED, build_log or "")])
    by_node: dict[str, dict[str, Any]] = {}
    for layer in inspector.get("Layers", []):
        if isinstance(layer, dict) and "Name" in layer:
            for part in _parts(layer["Name"]):
                by_node[part] = layer
    out = []
    for pl in plan_layers:
        node = nodes.get(pl["name"])
        trt_layer = (by_node.get(node) if node else None) or {}
        tactic = str(trt_layer.get("TacticName") or "")
        has_sparse_weights = bool(trt_layer.get("HasSparseWeights"))
        in_log_eligible = bool(node) and node in eligible
        in_log_picked = bool(node) and node in picked
        tactic_sparse = bool(trt_layer) and _sparse_tactic(tactic)
        picked_from = ("build log" if in_log_picked else "") or ("tactic name" if tactic_sparse else "") or None
        out.append({"name": pl["name"], "onnx_node": node, "n": pl.get("n"), "m": pl.get("m"),
                    "weights_2to4": bool(pl.get("sparse_2to4")),
                    "trt_eligible": in_log_eligible or has_sparse_weights,
                    "trt_has_sparse_weights": has_sparse_weights,
                    "trt_picked_sparse": in_log_picked or tactic_sparse,
                    "trt_picked_from": picked_from,
                    "trt_layer": trt_layer.get("Name"), "tactic": tactic or None})
    return out
