"""Adaptive inference scored on eval images: every single candidate and every router, PSNR-Y against average MACs.

Per eval image the LR input is cut into the patch grid (``patches``); every candidate runs on every patch once,
and each router's choice picks among those outputs, stitched with overlaps averaged. A router's cost is what it
ran: its candidates' MACs on whole patches (so the overlap is counted), plus its own MACs on every patch, over the
dense model's MACs on the whole image. Single candidates are scored twice: on the whole image (the deployment
they would replace) and on the same patch grid. The figure of merit is the gap between a router's PSNR and the
straight line between the two single candidates (whole image) nearest its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sls_deploy.adaptive.members import Candidate
from sls_deploy.adaptive.patches import coverage, extract, grid, stitch
from sls_deploy.adaptive.routers import Router
from sls_deploy.data.images import load_pair, quantize, to_image
from sls_deploy.data.metrics import psnr


@dataclass
class Point:
    name: str
    kind: str  # "whole image" | "patches" | "router"
    cost: float
    psnr: float
    share: list[float] = field(default_factory=list)  # routers: fraction of patches per candidate


def _psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    return float(psnr(quantize(to_image(sr)), quantize(to_image(hr)), crop_border=border, y_channel=True))


def line_at(singles: Sequence[Point], cost: float) -> tuple[float, str]:
    """PSNR of the straight line between the two single points nearest ``cost`` (bracketing it where they can),
    and which two; outside their range the nearest segment is extended."""
    pts = sorted(singles, key=lambda p: p.cost)
    i = 1
    while i < len(pts) - 1 and pts[i].cost < cost:
        i += 1
    a, b = pts[i - 1], pts[i]
    t = (cost - a.cost) / (b.cost - a.cost) if b.cost != a.cost else 0.0
    return a.psnr + t * (b.psnr - a.psnr), f"{a.name}..{b.name}"


@dataclass
class Evaluation:
    points: list[Point]
    maps: dict[str, dict]  # router -> {"image": name, "grid": [...], "choice": [...], "size": p, "lr_hw": [h, w]}
    images: list[str]

    def singles(self, kind: str = "whole image") -> list[Point]:
        return [p for p in self.points if p.kind == kind]

    def routers(self) -> list[Point]:
        return [p for p in self.points if p.kind == "router"]

    def gaps(self) -> dict[str, dict]:
        out = {}
        for r in self.routers():
            line, between = line_at(self.singles(), r.cost)
            pline, _ = line_at(self.singles("patches"), r.cost)
            out[r.name] = {"cost": r.cost, "psnr": r.psnr, "line_psnr": line, "between": between,
                           "gap_db": r.psnr - line, "gap_vs_patch_line_db": r.psnr - pline}
        return out


def evaluate(candidates: Sequence[Candidate], routers: Sequence[Router], files: Sequence[Path], scale: int,
             size: int, stride: int, router_macs: dict[str, float], dense_macs_per_pixel: float,
             degradation=None, map_image: int = 0, progress: Callable[[str], None] | None = None) -> Evaluation:
    """Score candidates and routers on ``files``. ``router_macs``: MACs of one router call on one patch;
    ``dense_macs_per_pixel``: the dense model's MACs per LR pixel. Costs are pixel-weighted over the images."""
    k = len(candidates)
    costs = torch.tensor([c.cost for c in candidates])
    sums: dict[tuple[str, str], list[float]] = {}
    macs: dict[tuple[str, str], float] = {}
    shares: dict[str, torch.Tensor] = {r.name: torch.zeros(k) for r in routers}
    pixels = 0.0
    maps: dict[str, dict] = {}
    names = []
    for fi, f in enumerate(files):
        hr, lr = load_pair(f, scale, degradation)
        h, w = lr.shape[-2:]
        pixels += h * w
        pos = grid(h, w, size, stride)
        patches = extract(lr, pos, size)
        cov = coverage(pos, size, h, w)
        outs = [c.run(patches) for c in candidates]
        for c, o in zip(candidates, outs):
            for kind, sr, cost in (("whole image", c.run(lr), c.cost), ("patches", stitch(o, pos, scale, h, w),
                                                                           c.cost * cov)):
                sums.setdefault((c.name, kind), []).append(_psnr_y(sr, hr, scale))
                macs[(c.name, kind)] = macs.get((c.name, kind), 0.0) + cost * h * w
        for r in routers:
            choice = r.choose(patches)
            picked = torch.stack([outs[int(j)][i] for i, j in enumerate(choice)])
            sums.setdefault((r.name, "router"), []).append(_psnr_y(stitch(picked, pos, scale, h, w), hr, scale))
            spent = float(costs[choice].sum()) * size * size + router_macs.get(r.name, 0.0) * len(pos) / \
                dense_macs_per_pixel
            macs[(r.name, "router")] = macs.get((r.name, "router"), 0.0) + spent
            shares[r.name] += torch.bincount(choice, minlength=k).float()
            if fi == map_image:
                maps[r.name] = {"image": Path(f).name, "grid": [list(p) for p in pos], "size": size,
                                "choice": [int(j) for j in choice], "lr_hw": [h, w]}
        names.append(Path(f).name)
        if progress:
            progress(Path(f).name)
    points = [Point(name, kind, macs[(name, kind)] / pixels, float(np.mean(v)),
                    [round(float(s), 4) for s in (shares[name] / shares[name].sum())] if kind == "router" else [])
              for (name, kind), v in sums.items()]
    return Evaluation(points, maps, names)
