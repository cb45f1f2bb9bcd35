"""The building blocks of a report: sections (title, text, table, picture) and number formatting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def fmt(v: Any, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def fmt_e(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1e}"


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: str | None = None  # file name of a picture in the bundle
    alt: str = ""


def channel_group_section(rep: dict, image: str) -> Section:
    """Kept units per channel group (a channel plan)."""
    return Section("Channel groups", [
        "Kept units per group (unit = output channels pruned together: r*r for a conv feeding PixelShuffle(r); a "
        "stream group keeps the same indices on all its producers)."],
        ["group", "unit", "producers", "dense units", "kept units", "kept"],
        [[g["name"], str(g["unit"]), str(len(g.get("producers") or [g.get("producer")])), str(g["dense_units"]),
          str(g["kept_units"]), f"{g['kept_fraction']:.2f}"] for g in rep["groups"]],
        image=image, alt="kept units per channel group")


def channel_layer_section(rep: dict, note: str) -> Section:
    """Per-layer MACs of a channel plan: which group narrows each layer's output and input."""
    rows = [[l["name"], l.get("out_group") or "-", l.get("in_group") or "-", f"{l['macs_dense'] / 1e9:.3f}",
             f"{l['macs_pruned'] / 1e9:.3f}", f"{l['macs_pruned'] / l['macs_dense']:.3f}" if l["macs_dense"] else "-"]
            for l in rep["layers"]]
    rows += [[d["name"], f"dense: {d['reason']}", "-", f"{d['macs'] / 1e9:.3f}", f"{d['macs'] / 1e9:.3f}", "1.000"]
             for d in rep["dense_layers"]]
    return Section("Layers", [note], ["layer", "output group", "input group", "GMACs dense", "GMACs pruned", "ratio"],
                   rows)


def quality_gate_summary(gate: dict | None) -> str:
    """The quality gate (stages/validate_gate.py) in one summary cell."""
    if not gate:
        return "not measured (a report made before the gate existed)"
    if not gate["passed"]:
        return "FAIL: " + gate["failure"].removeprefix("quality gate: ")
    lim = {k: "no limit" if gate[k] is None else f"{gate[k]:g} dB" for k in ("max_drop_vs_dense_db",
                                                                            "min_gain_vs_baseline_db")}
    return (f"pass (at most {lim['max_drop_vs_dense_db']} below dense, at least {lim['min_gain_vs_baseline_db']} "
            f"above {gate['baseline']})")


def quality_gate_section(gate: dict | None) -> Section | None:
    """The gate's table: every model it checked against the dense model and the baseline, with the limits."""
    if not gate:
        return None
    ch, base = gate["channel"].upper(), gate["baseline"]

    def lim(v, sign=""):
        return "none" if v is None else f"{v:{sign}.2f}"

    rows = [[r["name"], f"{r['psnr_db']:.2f}", f"{r['drop_vs_dense_db']:.2f}", lim(r["max_drop_vs_dense_db"]),
             f"{r['gain_vs_baseline_db']:+.2f}", lim(r["min_gain_vs_baseline_db"], "+"),
             "pass" if r["passed"] else "FAIL: " + " and ".join(
                 "too far below dense" if f == "dense" else f"short of the {base} limit" for f in r["failed"])]
            for r in gate["rows"]]
    return Section("Quality gate", [
        f"Does the pruned model still beat what it replaces? PSNR-{ch} on the eval data: dense "
        f"{gate['dense_db']:.2f} dB, {base} {gate['baseline_db']:.2f} dB. A model fails when it is more than "
        "validate.max_drop_vs_dense_db below dense (for a graph, plus its precision's max_psnr_drop_db) or less "
        f"than validate.min_gain_vs_baseline_db above {base}. Verdict: **{'pass' if gate['passed'] else 'FAIL'}**."],
        ["model", f"PSNR-{ch} dB", "below dense dB", "limit dB", f"vs {base} dB", "limit dB", "result"], rows)
