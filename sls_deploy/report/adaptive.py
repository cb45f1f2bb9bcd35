"""The adaptive report: a table, PSNR-Y against average MACs, and a routing map over one eval image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sls_deploy.report.plots import finish_axes, pyplot, save_figure

_COLORS = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def table(rep: dict) -> str:
    """Markdown: every point (cost, PSNR-Y), and each router's gap to the line between single members."""
    lines = [f"# Adaptive inference: {rep['model']}", "",
             f"Patches {rep['patch']['size']}x{rep['patch']['size']} LR, stride {rep['patch']['stride']} "
             f"({rep['patch']['stitch']}); routers fitted on {rep['train_patches']} train crops, operating point "
             f"{rep['target_cost']:.3f} set on the held-out train crops; eval: {len(rep['eval_images'])} images.",
             f"Cost: {rep['cost_note']}.", "",
             "| candidate / router | run as | avg MACs / dense | PSNR-Y (dB) | patches per candidate |",
             "|---|---|---|---|---|"]
    names = [c["name"] for c in rep["candidates"]]
    for p in sorted(rep["points"], key=lambda p: (p["kind"] != "whole image", p["kind"], p["cost"])):
        share = ", ".join(f"{n} {s:.0%}" for n, s in zip(names, p["share"]) if s) if p["share"] else ""
        lines.append(f"| {p['name']} | {p['kind']} | {p['cost']:.4f} | {p['psnr_y']:.3f} | {share} |")
    lines += ["", "| router | avg MACs | PSNR-Y | line between single members (whole image) | gap (dB) | "
              "gap to the patch-run members' line (dB) | oracle at this cost (dB) |", "|---|---|---|---|---|---|---|"]
    for name, g in rep["gaps"].items():
        oracle = f"{g['oracle_psnr']:.3f} ({g['oracle_psnr'] - g['line_psnr']:+.3f})" if "oracle_psnr" in g else "-"
        lines.append(f"| {name} | {g['cost']:.4f} | {g['psnr']:.3f} | {g['line_psnr']:.3f} ({g['between']}) | "
                     f"{g['gap_db']:+.3f} | {g['gap_vs_patch_line_db']:+.3f} | {oracle} |")
    lines += ["", "Oracle: per patch the candidate minimising its true error + lam * cost on the eval image itself, "
              "lam set to spend the router's MACs: an upper bound for any router on this patch grid, not a router."]
    return "\n".join(lines) + "\n"


def plot_points(rep: dict, path: str | os.PathLike) -> None:
    """PSNR-Y vs average MACs: single candidates (whole image: a line; patch grid: dashed), routers as stars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("whole image", "o-"), ("patches", "s--")):
        pts = sorted((p for p in rep["points"] if p["kind"] == kind), key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in pts], [p["psnr_y"] for p in pts], style, color="tab:gray",
                alpha=1.0 if kind == "whole image" else 0.5, label=f"single candidates ({kind})")
        if kind == "whole image":
            for p in pts:
                ax.annotate(p["name"], (p["cost"], p["psnr_y"]), fontsize=7, textcoords="offset points",
                            xytext=(3, -9))
    for i, p in enumerate(p for p in rep["points"] if p["kind"] == "router"):
        ax.plot([p["cost"]], [p["psnr_y"]], "*", markersize=12, color=_COLORS[(i + 2) % len(_COLORS)],
                label=f"router {p['name']}")
    finish_axes(fig, ax, path, "average MACs / dense (router and overlap counted)", "PSNR-Y (dB)",
                "Adaptive inference on the eval images")


def plot_map(rep: dict, maps: dict, files: Sequence[Path], scale: int, path: str | os.PathLike) -> None:
    """One eval image per router with each patch tinted by the candidate that ran it."""
    from sls_deploy.data.images import read_rgb

    if not maps:
        return
    plt = pyplot()
    names = [c["name"] for c in rep["candidates"]]
    by_name = {Path(f).name: f for f in files}
    fig, axes = plt.subplots(1, len(maps), figsize=(4.5 * len(maps), 4.2), squeeze=False)
    for ax, (router, m) in zip(axes[0], maps.items()):
        img = read_rgb(by_name[m["image"]])
        h, w = m["lr_hw"]
        img = img[:h * scale, :w * scale]
        tint = np.zeros((h, w, 3))
        count = np.zeros((h, w, 1))
        palette = [np.array(pyplot().get_cmap("viridis")(i / max(1, len(names) - 1))[:3]) for i in range(len(names))]
        size = m["size"]
        for (y, x), j in zip(m["grid"], m["choice"]):
            tint[y:y + size, x:x + size] += palette[j]
            count[y:y + size, x:x + size] += 1
        tint = np.kron(tint / np.maximum(count, 1), np.ones((scale, scale, 1)))
        ax.imshow(0.55 * img + 0.45 * tint)
        ax.set_title(f"{router}: {m['image']}", fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="s", linestyle="", color=palette[i], label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)
