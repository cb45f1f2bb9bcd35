"""The report's pictures: per-layer kept density, the PSNR-vs-MACs trade-off, and an eval crop side by side."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sls_deploy.core.atomic import atomic_path
from sls_deploy.core.errors import SlsError
from sls_deploy.core.safe_json import load_json

LAYER_PLOT = "report_layers.png"
TRADEOFF_PLOT = "report_tradeoff.png"
CROP_PLOT = "report_crop.png"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_axes(fig, ax, path: str | os.PathLike, xlabel: str, ylabel: str, title: str = "",
                legend_size: int = 8) -> None:
    """Label, grid and legend one axes, then lay out and save the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)


def plot_layer_density(rep: dict, path: str | os.PathLike) -> None:
    """Bar chart of each prunable layer's kept density N/M (2:4-compatible layers marked)."""
    plt = pyplot()
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
    save_figure(fig, path)


def tradeoff_points(rep: dict, bundle_root: Path) -> list[dict]:
    """This bundle and every sibling bundle (same folder) of the same model scored on the same eval images."""
    own = bundle_root.resolve()
    points = [{"bundle": own.name, "method": rep["method"], "budget": rep["budget"], "ratio": rep["macs"]["ratio"],
               "psnr": rep["psnr"]["pruned"], "this": True}]
    for other in sorted(own.parent.glob("*/report.json")):
        if other.parent == own:
            continue
        try:
            o = load_json(other, "report")
            same = (o["model"] == rep["model"] and o["psnr"]["eval_images"] == rep["psnr"]["eval_images"]
                    and o["psnr"]["channel"] == rep["psnr"]["channel"])
            if same:
                points.append({"bundle": other.parent.name, "method": o["method"], "budget": o["budget"],
                               "ratio": o["macs"]["ratio"], "psnr": o["psnr"]["pruned"], "this": False})
        except (SlsError, KeyError, TypeError):
            continue  # not one of ours, or an older report: skipped
    return points


def plot_tradeoff(rep: dict, path: str | os.PathLike) -> None:
    """PSNR vs MACs ratio: dense model, bicubic, this plan and sibling bundles (one curve per method)."""
    plt = pyplot()
    p = rep["psnr"]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.axhline(p["bicubic"], color="tab:gray", ls=":", label=f"{rep.get('baseline', 'bicubic')} {p['bicubic']:.2f}")
    ax.plot([1.0], [p["dense"]], "k*", ms=12, label=f"dense {p['dense']:.2f}")
    by_method: dict[str, list[dict]] = {}
    for pt in rep.get("tradeoff", []):
        by_method.setdefault(pt["method"], []).append(pt)
    for method, pts in sorted(by_method.items()):
        pts = sorted(pts, key=lambda q: q["ratio"])
        line, = ax.plot([q["ratio"] for q in pts], [q["psnr"] for q in pts], "o-", label=method)
        for q in pts:
            if q["this"]:
                ax.plot([q["ratio"]], [q["psnr"]], "o", ms=12, mfc="none", mec=line.get_color())
    ax.set_xlabel("MACs ratio (pruned / dense, whole model)")
    ax.set_ylabel(f"PSNR-{p['channel'].upper()} (dB)")
    ax.set_xlim(0, 1.05)
    ax.set_title(f"{rep['model']}: quality vs compute (circled: this bundle)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _busiest_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size HR window with the most detail (gradient energy)."""
    g = np.abs(np.diff(img.mean(axis=2), axis=0))[:, :-1] + np.abs(np.diff(img.mean(axis=2), axis=1))[:-1, :]
    H, W = g.shape
    if H <= size or W <= size:
        return 0, 0
    ii = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]
    y, x = np.unravel_index(np.argmax(sums), sums.shape)
    return int(y), int(x)


def plot_crop(image: Path, scale: int, dense: torch.nn.Module, pruned: torch.nn.Module,
              path: str | os.PathLike, size: int = 96, degradation=None) -> None:
    """Ground truth / baseline (bicubic, blurred input, ...) / dense / pruned on the most detailed HR window
    of one eval image."""
    from sls_deploy.data.degradations import default_degradation
    from sls_deploy.data.images import load_pair, to_image

    plt = pyplot()
    deg = default_degradation(scale, degradation)
    hr, lr = load_pair(image, scale, deg)
    with torch.no_grad():
        outs = {"ground truth": hr, deg.name: deg.baseline(lr), "dense": dense(lr), "pruned": pruned(lr)}
    imgs = {k: to_image(v) for k, v in outs.items()}
    size = min(size, *imgs["ground truth"].shape[:2])
    y, x = _busiest_window(imgs["ground truth"], size)
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
    for ax, (name, img) in zip(axes, imgs.items()):
        ax.imshow(img[y:y + size, x:x + size], interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{Path(image).name}, HR crop {size}x{size} at ({x}, {y}), x{scale}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


WIDTHS_PLOT = "report_widths.png"
FRAMES_PLOT = "report_frames.png"
DRIFT_PLOT = "report_drift.png"


def plot_group_widths(rep: dict, path: str | os.PathLike) -> None:
    """Bar chart of each channel group's kept units over its dense units (structured plans)."""
    plt = pyplot()
    groups = rep["groups"]
    names = [g["name"] for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 3.8))
    x = range(len(names))
    ax.bar(x, [g["dense_units"] for g in groups], color="0.85", label="dense units")
    ax.bar(x, [g["kept_units"] for g in groups], color="tab:blue", label="kept units")
    for i, g in enumerate(groups):
        ax.text(i, g["kept_units"], f"{g['kept_units']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [f"{n} (x{g['unit']})" if g["unit"] > 1 else n for n, g in zip(names, groups)],
                  rotation=90, fontsize=7)
    ax.set_ylabel("units (channels; x4: pixel-shuffle units of 4)")
    ax.set_title(f"{rep['model']}: {rep['method']}, budget {rep['budget']:g}, MACs ratio {rep['macs']['ratio']:.3f}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_per_frame(rep: dict, path: str | os.PathLike) -> None:
    """PSNR of frame t averaged over the eval clips: bicubic, dense and pruned along the recurrence."""
    plt = pyplot()
    p = rep["psnr"]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for k, style in (("bicubic", ":"), ("dense", "-"), ("pruned", "-")):
        v = p["per_frame_mean"][k]
        ax.plot(range(len(v)), v, style, marker="o", ms=3, label=k)
    ax.set_xlabel("frame in the eval window")
    ax.set_ylabel(f"PSNR-{p['channel'].upper()} (dB), mean over clips")
    ax.set_title(f"{rep['model']}: per-frame quality", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_drift(rep: dict, path: str | os.PathLike) -> None:
    """Per-frame PSNR of dense and pruned over one whole long clip, and their gap with its fitted slope."""
    plt = pyplot()
    d = rep["drift"]
    fig, (ax, gx) = plt.subplots(2, 1, figsize=(5.6, 4.6), sharex=True)
    ax.plot(d["psnr_dense"], "-", lw=1, label="dense")
    ax.plot(d["psnr_pruned"], "-", lw=1, label="pruned")
    ax.set_ylabel(f"PSNR-{rep['psnr']['channel'].upper()} (dB)")
    ax.set_title(f"{rep['model']}: drift over {d['frames']} frames of {d['clip']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    t = list(range(len(d["gap"])))
    gx.plot(t, d["gap"], "-", lw=1, color="C3", label="dense - pruned")
    if len(t) > 1:
        import numpy as np

        k, b = np.polyfit(t, d["gap"], 1)
        gx.plot(t, [k * x + b for x in t], "--", color="k", lw=1,
                label=f"slope {d['slope_db_per_100_frames']:+.3f} dB / 100 frames")
    finish_axes(fig, gx, path, "frame", "gap (dB)", legend_size=7)
