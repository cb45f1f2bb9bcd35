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
from sls_deploy.adaptive.patchset import y_mse
from sls_deploy.adaptive.routers import Router, bisect, worth_its_cost
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
    oracle: dict[str, dict] = field(default_factory=dict)  # router -> the oracle at its cost

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
                           "gap_db": r.psnr - line, "gap_vs_patch_line_db": r.psnr - pline,
                           **self.oracle.get(r.name, {})}
        return out


@dataclass
class _Image:
    name: str
    hr: torch.Tensor
    hw: tuple[int, int]
    pos: list[tuple[int, int]]
    patches: torch.Tensor
    outs: list[torch.Tensor]
    errors: torch.Tensor  # (N, K) per-patch Y MSE of each candidate (for the oracle only)


def _routed(img: _Image, choice: torch.Tensor, scale: int) -> torch.Tensor:
    picked = torch.stack([img.outs[int(j)][i] for i, j in enumerate(choice)])
    return stitch(picked, img.pos, scale, *img.hw)


def _oracle(images: Sequence[_Image], costs: torch.Tensor, size: int, pixels: float, cost: float, scale: int,
            extra: float) -> dict:
    """The best a router could do at ``cost``: per patch, argmin of its true error + lam * cost on the eval
    image itself (not deployable: it reads the ground truth), lam bisected to spend the same MACs."""
    def spent(lam: float) -> float:
        return sum(float(costs[worth_its_cost(im.errors, costs, lam)].sum()) for im in images) * size * size \
            / pixels + extra

    hi = max(float(im.errors.max()) for im in images) / max(float(costs[-1] - costs[0]), 1e-9) + 1.0
    lam = bisect(spent, cost, 0.0, hi)
    psnrs = [_psnr_y(_routed(im, worth_its_cost(im.errors, costs, lam), scale), im.hr, scale) for im in images]
    return {"oracle_cost": spent(lam), "oracle_psnr": float(np.mean(psnrs))}


def evaluate(candidates: Sequence[Candidate], routers: Sequence[Router], files: Sequence[Path], scale: int,
             size: int, stride: int, router_macs: dict[str, float], dense_macs_per_pixel: float,
             degradation=None, map_image: int = 0, progress: Callable[[str], None] | None = None) -> Evaluation:
    """Score candidates and routers on ``files``. ``router_macs``: MACs of one router call on one patch;
    ``dense_macs_per_pixel``: the dense model's MACs per LR pixel. Costs are pixel-weighted over the images.
    Beside each router, the oracle at the same cost (true errors on the eval image: an upper bound, not a
    router)."""
    k = len(candidates)
    costs = torch.tensor([c.cost for c in candidates])
    sums: dict[tuple[str, str], list[float]] = {}
    macs: dict[tuple[str, str], float] = {}
    shares: dict[str, torch.Tensor] = {r.name: torch.zeros(k) for r in routers}
    pixels = 0.0
    maps: dict[str, dict] = {}
    images: list[_Image] = []
    for fi, f in enumerate(files):
        hr, lr = load_pair(f, scale, degradation)
        h, w = lr.shape[-2:]
        pixels += h * w
        pos = grid(h, w, size, stride)
        patches = extract(lr, pos, size)
        cov = coverage(pos, size, h, w)
        outs = [c.run(patches) for c in candidates]
        hr_patches = extract(hr, [(y * scale, x * scale) for y, x in pos], size * scale)
        img = _Image(Path(f).name, hr, (h, w), pos, patches, outs,
                     torch.stack([y_mse(o, hr_patches) for o in outs], dim=1))
        images.append(img)
        for c, o in zip(candidates, outs):
            for kind, sr, cost in (("whole image", c.run(lr), c.cost), ("patches", stitch(o, pos, scale, h, w),
                                                                           c.cost * cov)):
                sums.setdefault((c.name, kind), []).append(_psnr_y(sr, hr, scale))
                macs[(c.name, kind)] = macs.get((c.name, kind), 0.0) + cost * h * w
        for r in routers:
            choice = r.choose(patches)
            sums.setdefault((r.name, "router"), []).append(_psnr_y(_routed(img, choice, scale), hr, scale))
            spent = float(costs[choice].sum()) * size * size + router_macs.get(r.name, 0.0) * len(pos) / \
                dense_macs_per_pixel
            macs[(r.name, "router")] = macs.get((r.name, "router"), 0.0) + spent
            shares[r.name] += torch.bincount(choice, minlength=k).float()
            if fi == map_image:
                maps[r.name] = {"image": Path(f).name, "grid": [list(p) for p in pos], "size": size,
                                "choice": [int(j) for j in choice], "lr_hw": [h, w]}
        if progress:
            progress(Path(f).name)
    points = [Point(name, kind, macs[(name, kind)] / pixels, float(np.mean(v)),
                    [round(float(s), 4) for s in (shares[name] / shares[name].sum())] if kind == "router" else [])
              for (name, kind), v in sums.items()]
    oracle = {}
    for r in routers:
        extra = router_macs.get(r.name, 0.0) * sum(len(im.pos) for im in images) / dense_macs_per_pixel / pixels
        oracle[r.name] = _oracle(images, costs, size, pixels, macs[(r.name, "router")] / pixels, scale, extra)
    return Evaluation(points, maps, [im.name for im in images], oracle)
