"""``sls-deploy route FAMILY``: fit routers on train patches, export them, score everything on the eval images.

Candidates: bicubic (the degradation's baseline), every family member, and the dense base model. Routers are fitted
on random crops of the recipe's train images (80% to fit, 20% to calibrate the operating point to ``target``
average cost); the eval images are used only for the final figures. Writes, in the family folder:
``router-<name>.onnx`` per router, ``adaptive.json``, ``adaptive.md``, ``adaptive.png`` (PSNR vs average MACs) and
``adaptive_map.png`` (which candidate ran each patch of one eval image).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from sls_deploy.adaptive.evaluate import Evaluation, evaluate
from sls_deploy.adaptive.family import Family, load_family, plain_folder_name
from sls_deploy.adaptive.patches import coverage, grid
from sls_deploy.adaptive.members import Candidate, bicubic_candidate, bundle_candidate, module_candidate
from sls_deploy.adaptive.patchset import patch_set, random_crops
from sls_deploy.adaptive.routers import ROUTERS, make_router
from sls_deploy.core.atomic import sha256_file, write_json, write_text
from sls_deploy.core.bundle import PLAN, RECIPE, WEIGHTS
from sls_deploy.core.errors import BundleError, DataError, UsageError, short_repr
from sls_deploy.core.numbers import MAX_SIDE
from sls_deploy.core.opening import check_graph_file, open_for_use
from sls_deploy.core.safe_json import load_json
from sls_deploy.models.base import ExportSpec
from sls_deploy.onnx.export import export_onnx
from sls_deploy.pruning.macs import layer_macs

RESULT_JSON = "adaptive.json"
RESULT_MD = "adaptive.md"
PLOT = "adaptive.png"
MAP_PLOT = "adaptive_map.png"
ROUTER_SPEC = ExportSpec(("lr_patches",), ("member",), {"lr_patches": {0: "patches"}, "member": {0: "patches"}})

Log = Callable[[str], None]


def router_file(name: str) -> str:
    return f"router-{name}.onnx"


def router_profiles(family: Family, engine_section) -> dict[str, dict[str, tuple]]:
    """{router name: {"lr_patches": (min, opt, max) shape}} of the routers ``route`` wrote in ``family``: patches
    of the routed size, as many as the grid gives on the engine profile's min/opt/max LR image (batch included).
    adaptive.json and every router graph are checked against the sha256 family.json records (graphs also with
    onnx.checker) before they are used. One-line BundleError otherwise, or when the family has no routers yet."""
    root = family.root
    if not (root / RESULT_JSON).is_file():
        raise BundleError(f"{root} has no routers (run `sls-deploy route {root}` first)")
    family.verify([RESULT_JSON])
    rep = load_json(root / RESULT_JSON, "adaptive report")
    try:
        size, stride = int(rep["patch"]["size"]), int(rep["patch"]["stride"])
        names = [str(n) for n in rep["routers"]]
        if not 1 <= size <= MAX_SIDE or not 1 <= stride <= size:
            raise ValueError(f"patch {size}, stride {stride}")
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{root / RESULT_JSON} is not a valid adaptive report ({short_repr(str(e))})") from None
    bad = next((n for n in names if not plain_folder_name(router_file(n))), None)
    if bad is not None:
        raise BundleError(f"{root / RESULT_JSON} lists router {short_repr(bad)}, not a plain name (refused)")
    family.verify([router_file(n) for n in names])
    for n in names:
        check_graph_file(root / router_file(n))
    shapes = []
    for n, h, w in (engine_section.levels()[lv] for lv in ("min", "opt", "max")):
        count = len(grid(max(h, size), max(w, size), size, stride)) * n
        shapes.append((count, 3, size, size))
    return {n: {"lr_patches": tuple(shapes)} for n in names}


def candidates_of(family: Family, recipe, device=None) -> tuple[list[Candidate], float]:
    """bicubic, the members and the dense base (on ``device``), cheapest first; and the dense MACs per LR pixel."""
    from sls_deploy.backends.loading import load_model, resolve_base_weights

    dense = recipe.adapter.export_module(load_model(recipe, resolve_base_weights(recipe, family.base_weights or None),
                                                    device=device))
    probe = 32
    per_px = sum(layer_macs(dense, torch.zeros(1, 3, probe, probe)).values()) / probe ** 2
    from sls_deploy.config.recipe import load_recipe

    members = []
    for m in family.members:  # every file a member candidate reads, checked against its manifest first
        r = load_recipe(open_for_use(family.path(m), [PLAN, WEIGHTS]).path(RECIPE))
        if r.name != family.model:
            raise BundleError(f"family member {m.folder} is a bundle of {r.name}, not {family.model}")
        members.append(bundle_candidate(family.path(m), r, m.folder, device))
    cands = [bicubic_candidate(recipe.scale, per_px, recipe.adapter.degradation(recipe.model).baseline)]
    cands += sorted(members, key=lambda c: c.cost) + [module_candidate("dense", dense, 1.0)]
    costs = [c.cost for c in cands]
    if any(b <= a for a, b in zip(costs, costs[1:])):
        raise UsageError("family members must have distinct costs below the dense model's: "
                         + ", ".join(f"{c.name} {c.cost:.4f}" for c in cands))
    return cands, per_px


def train_coverage(files, scale: int, size: int, stride: int) -> float:
    """Pixel-weighted coverage of the patch grid over the train images at least one patch large: the overlap
    factor the operating point allows for (eval images are never looked at). Sizes from the headers."""
    from sls_deploy.data.catalog import scan_images

    run = pixels = 0.0
    for im in scan_images(files):
        h, w = im.height // scale, im.width // scale
        if min(h, w) >= size:
            run += coverage(grid(h, w, size, stride), size, h, w) * h * w
            pixels += h * w
    if not pixels:
        raise DataError(f"no train image is as large as the router patch ({size} LR pixels)")
    return run / pixels


def route(root: str | Path, routers: Sequence[str] = ROUTERS, target: float | None = None, size: int = 48,
          stride: int = 44, train_patches: int = 1500, steps: int = 800, seed: int = 0,
          eval_data: str | None = None, log: Log = print, device: str | None = None) -> dict:
    """``device``: --device (None: the recipe's compute.device): where the candidates run and the routers train,
    resolved before any work."""
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.core.device import inference_device
    from sls_deploy.data.catalog import training_images
    from sls_deploy.data.sources import resolve_images
    from sls_deploy.report.adaptive import plot_map, plot_points, table

    family = load_family(root)
    recipe = load_recipe(open_for_use(family.path(family.members[0])).path(RECIPE))
    if recipe.modality != "image":
        raise UsageError(f"adaptive routing runs image models; {recipe.name} is a {recipe.modality} model")
    for r in routers:
        make_router(r)  # unknown names fail before any work
    where = inference_device(recipe.compute, device)
    if size < recipe.adapter.min_input_size(recipe.model):
        raise UsageError(f"--patch {size} is below the model's minimum input size")
    t0 = time.perf_counter()
    cands, per_px = candidates_of(family, recipe, where)
    costs = [c.cost for c in cands]
    if target is None:
        member_costs = sorted(costs[1:-1])
        target = member_costs[len(member_costs) // 2]
    if not costs[0] < target < costs[-1]:
        raise UsageError(f"--target-cost {target:g} must lie between the cheapest candidate's cost "
                         f"({costs[0]:.4f}) and the dense model's (1)")
    deg = recipe.adapter.degradation(recipe.model)
    train_files = training_images(recipe.data_train)
    eval_files = resolve_images(eval_data or recipe.data_eval)
    if not eval_files:
        raise DataError("no eval images")
    log("candidates: " + ", ".join(f"{c.name} ({c.cost:.3f})" for c in cands))
    lr, hr = random_crops(train_files, recipe.scale, size, train_patches, seed, deg, workers=recipe.data_workers)
    log(f"router training patches: {lr.shape[0]} crops of {size}x{size} LR from {len(train_files)} train images")
    ps = patch_set(cands, lr, hr, progress=lambda n: log(f"  errors of {n} on the train patches"))
    fit, calib = ps.split(0.8, seed)
    fit, calib = fit.to(where), calib.to(where)  # the routers train where the candidates ran
    cov = train_coverage(train_files, recipe.scale, size, stride)
    per_patch = target / cov  # the candidates' mean cost per patch that makes the whole-image average ``target``
    log(f"patch grid coverage on the train images: {cov:.3f}; routers aim at {per_patch:.4f} per patch")
    fitted = []
    for name in routers:
        r = make_router(name)
        r.fit(fit, calib, per_patch, seed=seed, steps=steps)
        export_onnx(r.module().eval(), ROUTER_SPEC, torch.zeros(2, 3, size, size), family.root / router_file(name))
        log(f"  router {name}: {r.info}")
        fitted.append(r)
    router_macs = {r.name: float(sum(layer_macs(r.module(), torch.zeros(1, 3, size, size)).values()))
                   for r in fitted}
    ev = evaluate(cands, fitted, eval_files, recipe.scale, size, stride, router_macs, per_px, deg,
                  progress=lambda n: log(f"  eval {n}"))
    rep = _report(family, recipe, cands, fitted, ev, target, size, stride, ps, router_macs, per_px,
                  time.perf_counter() - t0)
    rep["train_coverage"] = cov
    write_json(family.root / RESULT_JSON, rep)
    write_text(family.root / RESULT_MD, table(rep))
    plot_points(rep, family.root / PLOT)
    plot_map(rep, ev.maps, eval_files, recipe.scale, family.root / MAP_PLOT)
    written = [router_file(r.name) for r in fitted] + [RESULT_JSON, RESULT_MD, PLOT, MAP_PLOT]
    dataclasses.replace(family, files={f: sha256_file(family.root / f) for f in written}).save()
    return rep


def _report(family, recipe, cands, routers, ev: Evaluation, target, size, stride, ps, router_macs, per_px,
            seconds) -> dict:
    return {
        "family": str(family.root), "model": recipe.name, "target_cost": target,
        "patch": {"size": size, "stride": stride, "stitch": "overlaps averaged"},
        "candidates": [{"name": c.name, "cost": c.cost} for c in cands],
        "train_patches": int(ps.lr.shape[0]), "fit_fraction": 0.8,
        "eval_images": ev.images,
        "dense_macs_per_lr_pixel": per_px,
        "points": [{"name": p.name, "kind": p.kind, "cost": p.cost, "psnr_y": p.psnr, "share": p.share}
                   for p in ev.points],
        "routers": {r.name: {"label": r.label, "macs_per_patch": router_macs[r.name],
                             "file": router_file(r.name), **r.info} for r in routers},
        "gaps": ev.gaps(),
        "seconds": round(seconds, 1),
        "cost_note": "average MACs over the eval images (pixel-weighted) as a fraction of the dense model run on "
                     "each whole image; routers count whole patches (the overlap) and their own MACs",
    }
