"""Rendering a build report (report.json's dict): terminal summary, Markdown and self-contained HTML.

Both documents come from one list of sections (title, text, table, picture), so they always say the same.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from sls_deploy.pruning.target import TARGET_NAMES
from sls_deploy.report import video as report_video
from sls_deploy.report.plots import CROP_PLOT, LAYER_PLOT, TRADEOFF_PLOT, WIDTHS_PLOT
from sls_deploy.report.sections import (Section, channel_group_section, channel_layer_section, fmt as _f,
                                         fmt_e as _e, quality_gate_section, quality_gate_summary)

__all__ = ["LAYER_PLOT", "render_html", "render_markdown", "sections", "summary_rows", "summary_text"]




def _verdict(rep: dict) -> str:
    failed = [s for s in rep.get("shapes", []) if not s["passed"]]
    if failed:
        return f"FAIL: {len(failed)} of {len(rep['shapes'])} shape checks failed"
    if not rep["onnx_vs_torch"]["passed"]:
        return "FAIL: FP32 graph differs from PyTorch"
    gate = rep.get("quality_gate")
    if gate and not gate["passed"]:
        return "FAIL: quality gate"
    n = len(rep.get("shapes", []))
    parts = ([f"{n} shape checks"] if n else []) + (["quality gate"] if gate else [])
    return f"pass ({', '.join(parts)})" if parts else "pass"


def _latency_rows(rep: dict) -> list[tuple[str, str]]:
    lat = rep.get("latency") or {}
    out = []
    for s in lat.get("sizes", []):
        out.append((f"latency {lat['backend']} {s['lr_hw'][0]}x{s['lr_hw'][1]} (median)",
                    f"dense {s['dense']['median_ms']:.1f} ms / pruned {s['pruned']['median_ms']:.1f} ms = "
                    f"{s['ratio_pruned_over_dense']:.3f}x"))
    return out


def cost_rows(mac: dict) -> list[tuple[str, str]]:
    """The budget's own figure: the cost on the plan's target (beside the MACs ratio and the measured latency)."""
    if mac.get("target_ratio") is None:
        return []
    target = mac.get("target", "trt")
    warn = [("warning", "the budget was counted on --target none (N:M at N/M of the MACs): no dense backend realises "
                        "N:M savings and TensorRT only 2:4 on wide layers; the measured latency below is what it buys")
            ] if target == "none" and mac["target_ratio"] < mac.get("trt_2to4_ratio", 1.0) - 1e-9 else []
    return warn + [(f"cost ratio on --target {target}", f"{_f(mac['target_ratio'], 3)} ({TARGET_NAMES.get(target, target)}; "
                                                 "what the budget bounds, a count, not a measurement)")]


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    if rep.get("kind") == "video":

        return report_video.summary_rows(rep)
    p, mac, o = rep["psnr"], rep["macs"], rep["onnx_vs_torch"]
    ch = p["channel"].upper()
    rows = [
        ("verdict", _verdict(rep)),
        ("quality gate", quality_gate_summary(rep.get("quality_gate"))),
        ("model", f"{rep['model']} ({rep['method']}, " + (f"M={rep['m']})" if rep.get("m") else "channel pruning)")),
        ("budget", f"{rep['budget']:g} of dense MACs"),
        ("MACs dense / pruned", f"{_f(mac['dense'])} / {_f(mac['pruned'])} G at {mac['reference_output'][0]}x"
                                f"{mac['reference_output'][1]} out"),
        ("MACs ratio", _f(mac["ratio"], 3)),
        *cost_rows(mac),
        ("MACs ratio, 2:4 layers halved", f"{_f(mac.get('trt_2to4_ratio'), 3)} (the TensorRT bound)"),
        (f"PSNR-{ch} {rep.get('baseline', 'bicubic')}", f"{_f(p['bicubic'])} dB"),
        (f"PSNR-{ch} dense", f"{_f(p['dense'])} dB"),
        (f"PSNR-{ch} pruned (PyTorch)", f"{_f(p['pruned'])} dB ({p['pruned'] - p['dense']:+.2f} vs dense)"),
    ]
    if p.get("pruned_onnx") is not None:
        rows.append((f"PSNR-{ch} pruned (ONNX Runtime)", f"{_f(p['pruned_onnx'])} dB"))
    rows.append((f"{o['backend']} vs PyTorch", f"max |diff| {o['max_abs']:.1e} (tolerance {o['tolerance']:.0e}: "
                                               f"{'pass' if o['passed'] else 'FAIL'})"))
    rows += [(f"PSNR-{ch} {k} graph", f"{_f(v['psnr_' + p['channel']])} dB ({_f(v['psnr_vs_torch_fp32'])} dB vs FP32 "
                                      f"PyTorch)") for k, v in rep.get("precisions", {}).items() if k != "fp32"]
    return rows + _latency_rows(rep)


def summary_text(rep: dict) -> str:
    rows = summary_rows(rep)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def sections(rep: dict) -> list[Section]:
    if rep.get("kind") == "video":  # structured pruning of a video model: its own sections, the same renderers

        return report_video.sections(rep)
    p, s = rep["psnr"], rep["ssim"]
    ch = p["channel"]
    out = [Section("Summary", [
        f"Budget {rep['budget']:g} counts the **whole model's** MACs at the reference output "
        f"{rep['macs']['reference_output'][0]}x{rep['macs']['reference_output'][1]}. PSNR/SSIM on {ch.upper()} with "
        f"crop border {p['crop_border']}, eval images: {', '.join(p['eval_images'])}."],
        ["metric", "value"], [list(r) for r in summary_rows(rep)] + [
            [f"SSIM {rep.get('baseline', 'bicubic')} / dense / pruned", f"{_f(s['bicubic'], 4)} / {_f(s['dense'], 4)} / {_f(s['pruned'], 4)}"]])]
    gate = quality_gate_section(rep.get("quality_gate"))
    if gate:
        out.append(gate)
    if rep.get("notes"):
        out.append(Section("Input notes", ["Images that are not plain RGB were converted:"],
                           ["note"], [[n] for n in rep["notes"]]))
    out.append(Section("Per image (PSNR dB)", [], ["image", rep.get("baseline", "bicubic"), "dense", "pruned"],
                       [[k, _f(v["bicubic"]), _f(v["dense"]), _f(v["pruned"])] for k, v in p["per_image"].items()]))
    if rep.get("shapes"):
        out.append(Section("Accuracy at every deployment shape", [
            "Each backend against the PyTorch FP32 pruned model (reference) and the ground truth, on every eval "
            "image at the engine profile's min / opt / max LR sizes, an odd size and the recipe's extra sizes. "
            "Images smaller than a size are mirror-extended (column 'ext.'). Drop = reference PSNR - backend PSNR; "
            "limits per precision from the recipe's validate.max_psnr_drop_db (FP32 also validate.fp32_atol)."],
            ["shape", "LR HxW", "backend", "output", "max abs", "mean abs", "PSNR vs ref", f"PSNR-{ch.upper()}",
             "SSIM", "drop dB", "ext.", "result"],
            [[r["label"], f"{r['lr_hw'][0]}x{r['lr_hw'][1]}", r["backend"], "x".join(map(str, r["output_shape"])),
              _e(r["max_abs"]), _e(r["mean_abs"]),
              "identical" if r["psnr_vs_reference"] is None and r["max_abs"] == 0 else _f(r["psnr_vs_reference"]),
              _f(r["psnr_gt"]), _f(r["ssim_gt"], 4), _f(r["psnr_drop_db"], 3), str(r["extended_images"]),
              "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])] for r in rep["shapes"]]))
    lat = rep.get("latency") or {}
    if lat.get("sizes"):
        threads = f", {lat['threads']} threads" if lat.get("threads") else ""
        text = [f"Backend {lat['backend']}{threads}: {lat['warmup']} warm-up runs, then {lat['runs']} timed runs "
                "of each model, interleaved (same machine load for both). Absolute times depend on the machine; "
                "the ratio is the result."]
        if lat.get("note"):
            text.append(lat["note"] + ".")
        rows = []
        for z in lat["sizes"]:
            hw = f"{z['lr_hw'][0]}x{z['lr_hw'][1]}"
            for k in ("dense", "pruned"):
                t = z[k]
                rows.append([hw, k, f"{t['median_ms']:.1f}", f"{t['p90_ms']:.1f}", f"{t['images_per_s']:.2f}",
                             f"{z['ratio_pruned_over_dense']:.3f}" if k == "pruned" else "1"])
        out.append(Section("Latency, dense vs pruned", text,
                           ["LR HxW", "model", "median ms", "p90 ms", "images/s", "ratio (median)"], rows))
    if rep.get("precisions"):
        out.append(Section("Precisions (ONNX Runtime, CPU)", [
            f"FP32 islands: {', '.join(rep.get('graph', {}).get('fp32_islands', [])) or 'none'}. "
            "PSNR vs FP32 PyTorch is on the [0,1] outputs of the eval images."],
            ["graph", "file", f"PSNR-{ch.upper()} vs ground truth", "PSNR vs FP32 PyTorch", "max abs diff"],
            [[k, v["file"], _f(v["psnr_" + ch]), _f(v["psnr_vs_torch_fp32"]), _e(v["max_abs_vs_torch_fp32"])]
             for k, v in rep["precisions"].items()]))
    pred = rep.get("prediction")
    if pred:
        c = pred["counts"]
        out.append(Section("Predicted TensorRT benefit (a prediction)", [
            f"**Prediction, not a measurement.** {pred['label'][0].upper() + pred['label'][1:]}.",
            f"2:4 layers: {c['likely']} likely, {c['unlikely'] + c.get('borderline', 0)} unlikely to get a sparse "
            f"kernel; {c['no']} cannot. MACs ratio bound with every 2:4 layer halved: "
            f"{_f(pred['bound_all_2to4_halved'], 3)}; with only the 'likely' ones halved: "
            f"{_f(pred['bound_likely_halved'], 3)}."]))
    if rep.get("groups"):  # a channel plan: kept widths, and which group narrows each layer
        out.append(channel_group_section(rep, WIDTHS_PLOT))
        out.append(channel_layer_section(rep, "Plain narrower convs: every backend runs them faster, no sparse "
                                              "kernels needed."))
    else:
        out += _nm_layer_sections(rep, pred)
    n_other = sum(not t["this"] for t in rep.get("tradeoff", []))
    out.append(Section("Quality vs compute", [
        f"This bundle, the dense model and {n_other} other bundle(s) of {rep['model']} found next to it "
        "(same eval images)."], image=TRADEOFF_PLOT, alt="PSNR vs MACs ratio"))
    base = rep.get("baseline", "bicubic")
    out.append(Section("Eval crop", [f"Ground truth, {base}, dense and pruned on the most detailed window of the "
                                     "first eval image."], image=CROP_PLOT, alt=f"{base} / dense / pruned crop"))
    return out


def _nm_layer_sections(rep: dict, pred: dict | None) -> list[Section]:
    """The per-layer N:M table (with the TensorRT outlook and engine columns) and the density chart."""
    outlook = {r["name"]: r for r in (pred or {}).get("layers", [])}
    trt_known = any("trt_eligible" in l for l in rep["layers"])
    header = ["layer", "weight", "N:M", "2:4", "precision", "GMACs dense", "GMACs pruned", "TRT sparse (predicted)"]
    header += ["TRT eligible", "TRT picked sparse"] if trt_known else []
    rows = []
    for l in rep["layers"]:
        o = outlook.get(l["name"], {})
        row = [l["name"], "x".join(map(str, l["weight_shape"])), f"{l['n']}:{l['m']}",
               "yes" if l["sparse_2to4"] else "no", l.get("precision", "?"), f"{l['macs_dense'] / 1e9:.3f}",
               f"{l['macs_pruned'] / 1e9:.3f}", o.get("outlook", "-")]
        if trt_known:
            row += [_yes(l.get("trt_eligible")), _yes(l.get("trt_picked_sparse"))]
        rows.append(row)
    for d in rep["dense_layers"]:
        rows.append([d["name"], f"dense: {d['reason']}", "-", "no", "-", f"{d['macs'] / 1e9:.3f}",
                     f"{d['macs'] / 1e9:.3f}", "no"] + (["-", "-"] if trt_known else []))
    return [Section("Layers", [f"TensorRT: {rep['tensorrt']}."], header, rows),
            Section("Per-layer kept density", [], image=LAYER_PLOT, alt="per-layer kept density")]


def _yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def render_markdown(rep: dict) -> str:
    lines = [f"# sls-deploy report: {rep['model']}", ""]
    for sec in sections(rep):
        lines += [f"## {sec.title}", ""]
        for t in sec.text:
            lines += [t, ""]
        if sec.header:
            lines += ["| " + " | ".join(sec.header) + " |", "|" + "---|" * len(sec.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in sec.rows]
            lines.append("")
        if sec.image:
            lines += [f"![{sec.alt}]({sec.image})", ""]
    return "\n".join(lines)


def _inline_md(text: str) -> str:
    """Escape, then the one Markdown emphasis the sections use (**bold**)."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
        "td.fail{color:#b00;font-weight:600}img{max-width:100%;border:1px solid #eee}")


def render_html(rep: dict, images: dict[str, str | os.PathLike]) -> str:
    """One self-contained file: the same sections, pictures embedded as data: URIs."""
    body = [f"<h1>sls-deploy report: {html.escape(rep['model'])}</h1>"]
    for sec in sections(rep):
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        body += [f"<p>{_inline_md(t)}</p>" for t in sec.text]
        if sec.header:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in sec.header) + "</tr>")
            for r in sec.rows:
                cells = "".join(f"<td class=\"fail\">{html.escape(c)}</td>" if c.startswith("FAIL")
                                else f"<td>{_inline_md(c)}</td>" for c in r)
                body.append(f"<tr>{cells}</tr>")
            body.append("</table>")
        if sec.image and sec.image in images and os.path.isfile(images[sec.image]):
            with open(images[sec.image], "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
            body.append(f"<p><img alt=\"{html.escape(sec.alt)}\" src=\"data:image/png;base64,{data}\"></p>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>sls-deploy report: "
            f"{html.escape(rep['model'])}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")
