"""Rendering a build report (report.json's dict) as Markdown and as a terminal summary."""

from __future__ import annotations

import os
from typing import Any

LAYER_PLOT = "report_layers.png"


def _f(v: Any, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    p, mac, o = rep["psnr"], rep["macs"], rep["onnx_vs_torch"]
    ch = p["channel"].upper()
    return [
        ("model", f"{rep['model']} ({rep['method']}, M={rep['m']})"),
        ("budget", f"{rep['budget']:g} of dense MACs"),
        ("MACs dense / pruned", f"{_f(mac['dense'])} / {_f(mac['pruned'])} G at {mac['reference_output'][0]}x"
                                f"{mac['reference_output'][1]} out"),
        ("MACs ratio", _f(mac["ratio"], 3)),
        ("MACs ratio, 2:4 layers halved", f"{_f(mac.get('trt_2to4_ratio'), 3)} (the TensorRT bound)"),
        (f"PSNR-{ch} bicubic", f"{_f(p['bicubic'])} dB"),
        (f"PSNR-{ch} dense", f"{_f(p['dense'])} dB"),
        (f"PSNR-{ch} pruned (PyTorch)", f"{_f(p['pruned'])} dB ({p['pruned'] - p['dense']:+.2f} vs dense)"),
        (f"PSNR-{ch} pruned (ONNX Runtime)", f"{_f(p['pruned_onnx'])} dB"),
        ("ONNX Runtime vs PyTorch", f"max |diff| {o['max_abs']:.1e} (tolerance {o['tolerance']:.0e}: "
                                    f"{'pass' if o['passed'] else 'FAIL'})"),
    ] + [(f"PSNR-{ch} {k} graph", f"{_f(v['psnr_' + p['channel']])} dB ({_f(v['psnr_vs_torch_fp32'])} dB vs FP32 "
                                  f"PyTorch)") for k, v in rep.get("precisions", {}).items() if k != "fp32"]


def summary_text(rep: dict) -> str:
    rows = summary_rows(rep)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def render_markdown(rep: dict) -> str:
    p = rep["psnr"]
    lines = [f"# sls-deploy report: {rep['model']}", "",
             f"Budget {rep['budget']:g} counts the **whole model's** MACs at the reference output "
             f"{rep['macs']['reference_output'][0]}x{rep['macs']['reference_output'][1]}. "
             f"PSNR/SSIM on {p['channel'].upper()} with crop border {p['crop_border']}, "
             f"eval images: {', '.join(p['eval_images'])}.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(rep)]
    s = rep["ssim"]
    lines += [f"| SSIM bicubic / dense / pruned | {_f(s['bicubic'], 4)} / {_f(s['dense'], 4)} / {_f(s['pruned'], 4)} |",
              "", "## Per image (PSNR dB)", "", "| image | bicubic | dense | pruned |", "|---|---|---|---|"]
    lines += [f"| {k} | {_f(v['bicubic'])} | {_f(v['dense'])} | {_f(v['pruned'])} |" for k, v in p["per_image"].items()]
    lines += ["", "## ONNX Runtime vs PyTorch", "", "| LR size (HxW) | output shape | max abs | mean abs |",
              "|---|---|---|---|"]
    lines += [f"| {s['lr_hw'][0]}x{s['lr_hw'][1]} | {tuple(s['output_shape'])} | {s['max_abs']:.2e} | {s['mean_abs']:.2e} |"
              for s in rep["onnx_vs_torch"]["sizes"]]
    if rep.get("precisions"):
        ch = p["channel"]
        lines += ["", "## Precisions (ONNX Runtime, CPU)", "",
                  f"FP32 islands: {', '.join(rep.get('graph', {}).get('fp32_islands', [])) or 'none'}. "
                  "PSNR vs FP32 PyTorch is on the [0,1] outputs of the eval images.", "",
                  f"| graph | file | PSNR-{ch.upper()} vs ground truth | PSNR vs FP32 PyTorch | max abs diff |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['file']} | {_f(v['psnr_' + ch])} | {_f(v['psnr_vs_torch_fp32'])} | "
                  f"{v['max_abs_vs_torch_fp32']:.2e} |" for k, v in rep["precisions"].items()]
    lines += ["", "## Layers", "", "| layer | weight | N:M | 2:4 | GMACs dense | GMACs pruned |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {l['name']} | {'x'.join(map(str, l['weight_shape']))} | {l['n']}:{l['m']} | "
              f"{'yes' if l['sparse_2to4'] else 'no'} | {l['macs_dense'] / 1e9:.3f} | {l['macs_pruned'] / 1e9:.3f} |"
              for l in rep["layers"]]
    lines += [f"| {d['name']} | dense: {d['reason']} | - | no | {d['macs'] / 1e9:.3f} | {d['macs'] / 1e9:.3f} |"
              for d in rep["dense_layers"]]
    lines += ["", f"![per-layer kept density]({LAYER_PLOT})", "", f"TensorRT: {rep['tensorrt']}", ""]
    return "\n".join(lines)


def plot_layer_density(rep: dict, path: str | os.PathLike) -> None:
    """Bar chart of each prunable layer's kept density N/M (2:4-compatible layers marked) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    layers = rep["layers"]
    names = [l["name"] for l in layers]
    dens = [l["n"] / l["m"] for l in layers]
    colors = ["tab:green" if l["sparse_2to4"] else "tab:gray" for l in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names) + 2), 3.4))
    ax.bar(range(len(names)), dens, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept density N/M")
    ax.set_title(f"{rep['model']}: {rep['method']}, budget {rep['budget']:g}, MACs ratio {rep['macs']['ratio']:.3f} "
                 "(green: 2:4-compatible)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
