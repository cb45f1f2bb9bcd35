"""The quality gate of `validate`: is the pruned model still worth shipping against the dense model and the
baseline?

Every other check of validate compares a graph with the pruned PyTorch model, so a model broken before export
(a build whose steps all went to the search, weights from another run) passes them all. The gate compares the
pruned model's eval PSNR with the dense base model's (at most ``validate.max_drop_vs_dense_db`` below it) and with
the task's baseline, the degradation's trivial restoration (bicubic upscaling for SR, the blurred input for
deblurring; at least ``validate.min_gain_vs_baseline_db`` above it). Each exported graph whose PSNR against the
ground truth was measured is held to the same baseline limit, and to the dense limit widened by its precision's
``validate.max_psnr_drop_db`` (the drop below the FP32 model that precision is already allowed).
"""

from __future__ import annotations

from typing import Any, Mapping

from sls_deploy.config.recipe import ValidateSection


def _row(name: str, psnr: float, dense: float, baseline: float, max_drop: float | None,
         min_gain: float | None) -> dict[str, Any]:
    drop, gain = dense - psnr, psnr - baseline
    failures = []
    if max_drop is not None and drop > max_drop:
        failures.append("dense")
    if min_gain is not None and gain < min_gain:
        failures.append("baseline")
    return {"name": name, "psnr_db": psnr, "drop_vs_dense_db": drop, "max_drop_vs_dense_db": max_drop,
            "gain_vs_baseline_db": gain, "min_gain_vs_baseline_db": min_gain, "failed": failures,
            "passed": not failures}


def quality_gate(val: ValidateSection, baseline_name: str, baseline_db: float, dense_db: float, pruned_db: float,
                 graphs: Mapping[str, float] | None = None, channel: str = "y") -> dict[str, Any]:
    """The gate's record for report.json: the figures (PSNR on ``channel``), the limits and a row per model
    checked (the pruned PyTorch model, then each graph of ``graphs`` {precision: PSNR vs ground truth})."""
    rows = [_row("pruned", pruned_db, dense_db, baseline_db, val.max_drop_vs_dense_db, val.min_gain_vs_baseline_db)]
    for p, psnr in (graphs or {}).items():
        limit = None if val.max_drop_vs_dense_db is None else val.max_drop_vs_dense_db + val.max_drop(p)
        rows.append(_row(f"{p} graph", psnr, dense_db, baseline_db, limit, val.min_gain_vs_baseline_db))
    gate = {"channel": channel, "baseline": baseline_name, "baseline_db": baseline_db, "dense_db": dense_db,
            "max_drop_vs_dense_db": val.max_drop_vs_dense_db, "min_gain_vs_baseline_db": val.min_gain_vs_baseline_db,
            "rows": rows, "passed": all(r["passed"] for r in rows)}
    gate["failure"] = gate_failure(gate)
    return gate


def _limit(v: float | None) -> str:
    return "none" if v is None else f"{v:g} dB"


def _describe(row: Mapping[str, Any], gate: Mapping[str, Any]) -> str:
    """'pruned 16.98 dB is 13.00 dB below dense 29.98 dB (limit 0.5 dB) and 11.80 dB below bicubic 28.78 dB'."""
    base, parts = gate["baseline"], []
    if "dense" in row["failed"]:
        parts.append(f"{row['drop_vs_dense_db']:.2f} dB below dense {gate['dense_db']:.2f} dB "
                     f"(limit {_limit(row['max_drop_vs_dense_db'])})")
    if "baseline" in row["failed"]:
        gain, need = row["gain_vs_baseline_db"], row["min_gain_vs_baseline_db"]
        where = f"{-gain:.2f} dB below" if gain < 0 else f"only {gain:.2f} dB above"
        parts.append(f"{where} {base} {gate['baseline_db']:.2f} dB"
                     + (f" (limit {need:+g} dB)" if need else ""))
    return f"{row['name']} {row['psnr_db']:.2f} dB is " + " and ".join(parts)


def gate_failure(gate: Mapping[str, Any] | None) -> str | None:
    """The one-line verdict of a failed gate (the first failing row, and how many more), None when it passed."""
    failed = [r for r in (gate or {}).get("rows", []) if not r["passed"]]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more; see report.json)" if len(failed) > 1 else ""
    return f"quality gate: {_describe(failed[0], gate)}{more}"
