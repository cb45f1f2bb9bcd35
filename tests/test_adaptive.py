"""Adaptive inference (`sls_deploy.adaptive`, `sls-deploy route`): the patch grid, the routers' operating point from
train data only, router ONNX graphs, the family folder, the CLI, and one tiny family end to end."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import data_error, error_line, run_cli
from sls_deploy.adaptive.family import FAMILY, build_family, check_budgets, load_family
from sls_deploy.adaptive.patches import coverage, extract, grid, starts, stitch
from sls_deploy.adaptive.patchset import PatchSet
from sls_deploy.adaptive.routers import (ClassSrRouter, EdgeRouter, ROUTERS, SlsRouter, average_loss, class_loss,
                                         label_lambda, make_router, mean_cost, worth_its_cost)
from sls_deploy.adaptive.run import ROUTER_SPEC
from sls_deploy.config.recipe import load_recipe
from sls_deploy.core.errors import BundleError
from sls_deploy.onnx.export import export_onnx

P = 8  # LR patch side of the synthetic patch sets
COSTS = torch.tensor([0.02, 0.3, 0.6, 1.0])
STEPS = 80  # training steps of the learned routers: enough for the classifier to leave the majority class


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two, and far faster when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the patch grid
@pytest.mark.parametrize("h, w, size, stride", [(16, 20, 8, 6), (14, 17, 8, 8), (8, 8, 8, 1), (23, 9, 5, 3)])
def test_grid_covers_every_pixel_with_the_last_patch_on_the_edge(h, w, size, stride):
    pos = grid(h, w, size, stride)
    hits = np.zeros((h, w), dtype=int)
    for y, x in pos:
        assert 0 <= y <= h - size and 0 <= x <= w - size
        hits[y:y + size, x:x + size] += 1
    assert hits.min() >= 1
    for n in (h, w):
        s = starts(n, size, stride)
        assert s[0] == 0 and s[-1] == n - size
        assert all(b - a == stride for a, b in zip(s[:-2], s[1:-1]))  # every step but the last is the stride
        if len(s) > 1:
            assert 0 < s[-1] - s[-2] <= stride
    assert len(pos) == len(starts(h, size, stride)) * len(starts(w, size, stride))


@pytest.mark.parametrize("scale, size, stride", [(4, 8, 6), (2, 5, 2), (3, 6, 6), (4, 16, 16)])
def test_stitch_of_extract_is_the_whole_image_run_for_a_pointwise_model(scale, size, stride):
    # nearest-neighbour upscaling has no border effects: patch-wise equals whole-image exactly (dyadic values keep
    # the overlap averages exact)
    g = torch.Generator().manual_seed(0)
    h, w = 16, 19
    lr = torch.randint(0, 256, (1, 3, h, w), generator=g).float() / 256

    def nn_up(x):
        return x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)

    pos = grid(h, w, size, stride)
    patches = extract(lr, pos, size)
    assert patches.shape == (len(pos), 3, size, size)
    out = stitch(nn_up(patches), pos, scale, h, w)
    assert out.shape == (1, 3, h * scale, w * scale)
    assert torch.equal(out, nn_up(lr))


def test_stitch_averages_overlapping_outputs():
    # two 4x4 patches of a 4x6 image at x = 0 and x = 2: columns 2-3 are covered by both
    pos = grid(4, 6, 4, 2)
    assert pos == [(0, 0), (0, 2)]
    for scale in (1, 2):
        outs = torch.stack([torch.full((1, 4 * scale, 4 * scale), 1.0), torch.full((1, 4 * scale, 4 * scale), 3.0)])
        got = stitch(outs, pos, scale, 4, 6)[0, 0]
        cols = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]).repeat_interleave(scale)
        assert torch.equal(got, cols.expand(4 * scale, -1))


@pytest.mark.parametrize("h, w, size, stride, expected", [
    (8, 8, 4, 4, 1.0),          # an exact tiling: no overlap
    (10, 8, 4, 4, 6 * 16 / 80),  # rows at 0, 4, 6 (edge-aligned), columns at 0, 4
    (10, 10, 4, 3, 9 * 16 / 100),  # 0, 3, 6 on both axes
    (5, 5, 4, 1, 4 * 16 / 25),   # 0, 1 on both axes
])
def test_coverage_by_hand(h, w, size, stride, expected):
    assert coverage(grid(h, w, size, stride), size, h, w) == pytest.approx(expected)


@pytest.mark.parametrize("h, w, size, stride, fragment", [
    (6, 10, 8, 4, "smaller than the patch size 8"),
    (10, 6, 8, 4, "smaller than the patch size 8"),
    (16, 16, 8, 9, "need 1 <= stride <= size"),
    (16, 16, 8, 0, "need 1 <= stride <= size"),
])
def test_bad_patch_geometry_is_a_one_line_data_error(h, w, size, stride, fragment):
    assert fragment in data_error(grid, h, w, size, stride)


def test_stitch_refuses_a_wrong_number_of_outputs():
    pos = grid(8, 8, 4, 4)
    assert "3 patch outputs for 4 positions" in data_error(stitch, torch.zeros(3, 3, 8, 8), pos, 2, 8, 8)


# --------------------------------------------------------------------------- a synthetic train patch set
def _patches(n: int, seed: int, amp_range=(0.002, 0.35)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` LR patches: a flat colour plus noise of a log-uniform random amplitude (it drives the edge energy); the
    colour brightens with the amplitude too, a cue the tiny learned routers pick up within a few steps."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(amp_range[0]), math.log(amp_range[1])
    t = torch.rand(n, generator=g)
    amp = torch.exp(lo + (hi - lo) * t)
    base = 0.15 + 0.6 * t.view(n, 1, 1, 1) + 0.1 * torch.rand(n, 3, 1, 1, generator=g)
    lr = (base + amp.view(n, 1, 1, 1) * torch.randn(n, 3, P, P, generator=g)).clamp(0, 1)
    return lr, amp


def _patch_set(n: int = 240, seed: int = 0) -> PatchSet:
    """Errors grow with the patch's noise amplitude and fall with the candidate's cost, with a little noise; the
    gains per cost halve from one candidate to the next, so every candidate is worth its cost on some patches."""
    lr, amp = _patches(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    factor = torch.tensor([1.0, 0.72, 0.57, 0.47])
    errors = (1.0 + 1000.0 * amp).unsqueeze(1) * factor * (1 + 0.05 * torch.rand(n, 4, generator=g))
    return PatchSet(lr, errors, COSTS.clone())


def _sobel_energy(lr: torch.Tensor) -> torch.Tensor:
    """Mean |Gx| + |Gy| (3x3 Sobel, valid positions) of BT.601 luma, written out independently of the router."""
    y = (lr.clamp(0, 1) * torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)).sum(1)
    gx = (y[:, :-2, 2:] - y[:, :-2, :-2]) + 2 * (y[:, 1:-1, 2:] - y[:, 1:-1, :-2]) + (y[:, 2:, 2:] - y[:, 2:, :-2])
    gy = (y[:, 2:, :-2] - y[:, :-2, :-2]) + 2 * (y[:, 2:, 1:-1] - y[:, :-2, 1:-1]) + (y[:, 2:, 2:] - y[:, :-2, 2:])
    return (gx.abs() + gy.abs()).mean(dim=(1, 2))


# --------------------------------------------------------------------------- operating point and losses
def test_worth_its_cost_by_hand_with_ties_to_the_cheaper():
    costs = torch.tensor([0.0, 1.0, 2.0])
    errors = torch.tensor([[10.0, 4.0, 1.0],   # 10, 5, 3 -> 2
                           [2.0, 1.9, 1.8],    # 2, 2.9, 3.8 -> 0
                           [3.0, 2.0, 1.0],    # 3, 3, 3 -> 0 (a three-way tie)
                           [9.0, 2.0, 1.0],    # 9, 3, 3 -> 1 (a tie between 1 and 2)
                           [4.0, 2.0, 2.5]])   # 4, 3, 4.5 -> 1
    assert worth_its_cost(errors, costs, 1.0).tolist() == [2, 0, 0, 1, 1]
    assert worth_its_cost(errors, costs, 0.0).tolist() == [2, 2, 2, 2, 1]  # lam 0: least error (ties: cheaper)
    assert worth_its_cost(errors, costs, 100.0).tolist() == [0] * 5


@pytest.mark.parametrize("target", [0.15, 0.4, 0.7])
def test_label_lambda_reaches_the_target_from_below_and_close(target):
    ps = _patch_set(400)
    lam = label_lambda(ps, target)
    cost = mean_cost(worth_its_cost(ps.errors, ps.costs, lam), ps.costs)
    assert cost <= target
    assert cost > target - 0.02  # one patch changes label at a time: the steps are ~1/400
    assert mean_cost(worth_its_cost(ps.errors, ps.costs, lam * 0.999), ps.costs) > target  # the smallest such lam


def test_class_loss_formula_for_three_classes():
    # (K - 1) - sum over pairs |p_i - p_j|, batch mean
    assert float(class_loss(torch.eye(3))) == pytest.approx(0.0)
    assert float(class_loss(torch.eye(4)[[0, 2]])) == pytest.approx(0.0)
    assert float(class_loss(torch.full((5, 3), 1 / 3))) == pytest.approx(2.0)
    assert float(class_loss(torch.full((2, 4), 1 / 4))) == pytest.approx(3.0)
    p = torch.tensor([[0.5, 0.3, 0.2]])  # pairs: 0.2 + 0.3 + 0.1 = 0.6 -> 2 - 0.6
    assert float(class_loss(p)) == pytest.approx(1.4)
    assert float(class_loss(torch.cat([p, torch.eye(3)[:1]]))) == pytest.approx(0.7)


def test_average_loss_is_zero_at_the_target_fractions():
    t = torch.tensor([0.5, 0.25, 0.25])
    onehot = torch.eye(3)[[0, 0, 1, 2]]
    assert float(average_loss(onehot, t)) == pytest.approx(0.0, abs=1e-7)
    soft = torch.tensor([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3]])
    assert float(average_loss(soft, t)) == pytest.approx(0.0, abs=1e-7)
    # away from it: sum_k |sum_i p_ik - n t_k| / (4 n / K): |2 - 1| + |0 - 1| over 4 * 2 / 2
    assert float(average_loss(torch.eye(2)[[0, 0]], torch.tensor([0.5, 0.5]))) == pytest.approx(0.5)


# --------------------------------------------------------------------------- routers fitted on train data only
def test_edge_thresholds_are_train_quantiles_and_eval_data_change_nothing():
    ps = _patch_set(240)
    fit, calib = ps.split(0.8, seed=0)
    target = 0.35
    r = EdgeRouter()
    r.fit(fit, calib, target)
    train_lr = torch.cat([fit.lr, calib.lr])
    train_err = torch.cat([fit.errors, calib.errors])
    labels = worth_its_cost(train_err, COSTS, label_lambda(PatchSet(train_lr, train_err, COSTS), target))
    cum = torch.cumsum(torch.bincount(labels, minlength=4).float(), 0) / labels.numel()
    assert 0 < cum[0] < cum[2] < 1  # the synthetic set needs more than one candidate
    expected = torch.quantile(_sobel_energy(train_lr), cum[:-1])
    thresholds = r.module().thresholds.clone()
    torch.testing.assert_close(thresholds, expected, rtol=1e-5, atol=1e-4)
    assert r.info["thresholds"] == [round(float(t), 4) for t in thresholds]
    # the train patches' choices follow their label fractions
    share = torch.bincount(r.choose(train_lr), minlength=4).float() / train_lr.shape[0]
    torch.testing.assert_close(torch.cumsum(share, 0), cum, atol=2.5 / train_lr.shape[0], rtol=0)
    # choosing on other (noisier) data leaves the thresholds alone
    eval_lr, _ = _patches(50, seed=7, amp_range=(0.2, 0.5))
    r.choose(eval_lr)
    assert torch.equal(r.module().thresholds, thresholds)
    both = torch.cat([train_lr, eval_lr])
    assert not torch.allclose(torch.quantile(_sobel_energy(both), cum[:-1]), thresholds)  # they would have moved


@pytest.mark.parametrize("kind", ["sls", "classsr"])
def test_learned_routers_calibrate_on_the_calibration_part_and_are_deterministic(kind):
    ps = _patch_set(240)
    fit, calib = ps.split(0.8, seed=0)
    # a calibration part unlike the fit part (the flatter half of it), so the two parts' costs differ
    flat = _sobel_energy(calib.lr) < _sobel_energy(calib.lr).median()
    calib = PatchSet(calib.lr[flat], calib.errors[flat], COSTS)
    target = 0.35
    r = make_router(kind)
    r.fit(fit, calib, target, seed=3, steps=STEPS)
    on_calib = mean_cost(r.choose(calib.lr), COSTS)
    on_fit = mean_cost(r.choose(fit.lr), COSTS)
    assert r.info["calib_cost"] == pytest.approx(on_calib, abs=6e-5)  # rounded to 4 decimals
    assert abs(on_fit - on_calib) > 1e-3  # the check above tells the parts apart
    if kind == "sls":
        assert on_calib <= target  # beta is set on the calibration part
    again = make_router(kind)
    again.fit(fit, calib, target, seed=3, steps=STEPS)
    probe, _ = _patches(64, seed=11)
    assert torch.equal(again.choose(probe), r.choose(probe))
    assert again.info == r.info


# --------------------------------------------------------------------------- router ONNX graphs
@pytest.mark.parametrize("kind", ROUTERS)
def test_router_onnx_gives_the_same_choices(kind, tmp_path):
    ps = _patch_set(200)
    fit, calib = ps.split(0.8, seed=0)
    r = make_router(kind)
    r.fit(fit, calib, 0.4, seed=0, steps=STEPS)
    path = export_onnx(r.module().eval(), ROUTER_SPEC, torch.zeros(2, 3, P, P), tmp_path / f"router-{kind}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lr, _ = _patches(37, seed=5)
    (got,) = sess.run(["member"], {"lr_patches": lr.numpy()})
    assert got.dtype == np.int64 and got.shape == (37,)
    want = r.choose(lr)
    assert len(set(want.tolist())) > 1  # more than one candidate chosen: a real comparison
    np.testing.assert_array_equal(got, want.numpy())


def test_unfitted_router_and_unknown_router_are_errors():
    from sls_deploy.core.errors import UsageError

    for cls in (SlsRouter, ClassSrRouter, EdgeRouter):
        with pytest.raises(UsageError, match="not fitted"):
            cls().module()
    with pytest.raises(UsageError, match="unknown router 'knn'"):
        make_router("knn")


# --------------------------------------------------------------------------- the family folder
def _bundle_error(fn, *args, **kw) -> str:
    with pytest.raises(BundleError) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _write_family(root: Path, model: str = "edsr-tiny-x4", folders=("b0.40", "b0.70")) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for f in folders:
        (root / f).mkdir(exist_ok=True)
    (root / FAMILY).write_text(json.dumps({
        "kind": "sls-deploy family", "model": model, "method": "oneshot", "base_weights": "",
        "members": [{"budget": float(f[1:]), "folder": f} for f in folders]}))


def test_load_family_refusals(tmp_path):
    assert "not a family folder" in _bundle_error(load_family, tmp_path)
    fam = tmp_path / "fam"
    _write_family(fam)
    loaded = load_family(fam)
    assert [m.folder for m in loaded.members] == ["b0.40", "b0.70"] and loaded.model == "edsr-tiny-x4"
    (fam / FAMILY).write_text("{not json")
    assert "not a valid family file" in _bundle_error(load_family, fam)
    (fam / FAMILY).write_text(json.dumps({"kind": "sls-deploy family", "model": "m"}))  # no members
    assert "not a valid family file" in _bundle_error(load_family, fam)
    (fam / FAMILY).write_text(json.dumps({"kind": "a bundle", "model": "m", "members": []}))
    assert "not a valid family file" in _bundle_error(load_family, fam)
    _write_family(fam)
    (fam / "b0.70").rmdir()
    assert "family member b0.70 is missing" in _bundle_error(load_family, fam)


def test_check_budgets_sorts_dedups_and_refuses_shared_folders():
    assert check_budgets([0.6, 0.25, 0.6, 0.4]) == (0.25, 0.4, 0.6)
    assert "same member folder twice" in _bundle_error(check_budgets, [0.401, 0.404])
    assert check_budgets([0.401, 0.41]) == (0.401, 0.41)


class _NotCalled(Exception):
    pass


def _settings_stub(budget):
    raise _NotCalled(budget)


@pytest.mark.parametrize("case, fragment", [
    ("file", "is a file, not a folder"),
    ("stray", "is not empty and not a family folder (it holds notes.txt)"),
    ("other model", "holds a family of edsr-other, not edsr-tiny-x4"),
    ("broken family", "not a valid family file"),
])
def test_build_family_checks_the_out_folder_before_resolving_settings(tmp_path, tiny_recipe, case, fragment):
    recipe = load_recipe(tiny_recipe)
    out = tmp_path / "fam"
    if case == "file":
        out.write_text("x")
    elif case == "stray":
        (out / "b0.40").mkdir(parents=True)
        (out / "notes.txt").write_text("x")
    elif case == "other model":
        _write_family(out, model="edsr-other")
    else:
        _write_family(out)
        (out / FAMILY).write_text("[]")
    assert fragment in _bundle_error(build_family, recipe, [0.4, 0.7], out, _settings_stub, lambda s: None)


@pytest.mark.parametrize("case", ["new", "members only", "same model"])
def test_build_family_resolves_settings_for_an_acceptable_out_folder(tmp_path, tiny_recipe, case):
    recipe = load_recipe(tiny_recipe)
    out = tmp_path / "fam"
    if case == "members only":  # an interrupted family build
        (out / "b0.40").mkdir(parents=True)
    elif case == "same model":
        _write_family(out)
    with pytest.raises(_NotCalled):
        build_family(recipe, [0.7, 0.4], out, _settings_stub, lambda s: None)
    assert "at least two distinct budgets" in _bundle_error(build_family, recipe, [0.4, 0.4], out, _settings_stub,
                                                            lambda s: None)


# --------------------------------------------------------------------------- the command line
def test_route_on_a_folder_that_is_not_a_family(tmp_path, capsys):
    code, _, err = run_cli(capsys, "route", tmp_path)
    assert code == 1
    assert "is not a family folder" in error_line(err)


def test_route_stride_larger_than_patch_is_a_usage_error(tmp_path, capsys):
    _write_family(tmp_path / "fam")
    code, _, err = run_cli(capsys, "route", tmp_path / "fam", "--patch", "8", "--stride", "9")
    assert code == 2
    assert "--stride 9 is larger than --patch 8" in error_line(err)


def test_build_help_mentions_repeating_budget_for_a_family(capsys):
    code, out, _ = run_cli(capsys, "build", "--help")
    assert code == 0
    text = "".join(out.split())  # click wraps the help, even inside `sls-deploy route`
    assert "Repeatit(--budget0.25--budget0.4--budget0.6)tobuildafamily" in text
    assert "`sls-deployroute`" in text


# --------------------------------------------------------------------------- a tiny family end to end
def test_family_build_and_route_end_to_end(tmp_path, tiny_recipe, tiny_weights, capsys):
    fam = tmp_path / "fam"
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--weights", tiny_weights, "--budget", "0.7",
                           "--budget", "0.4", "--method", "oneshot", "--steps", "0", "--precision", "fp32",
                           "--out", fam, "--no-progress")
    assert code == 0, err
    family = json.loads((fam / FAMILY).read_text())
    assert [m["folder"] for m in family["members"]] == ["b0.40", "b0.70"]
    assert all((fam / f / "model.onnx").is_file() for f in ("b0.40", "b0.70"))

    # tiny eval images are 14-16 LR pixels a side: 8-pixel patches every 6 overlap
    code, out, err = run_cli(capsys, "route", fam, "--train-patches", "60", "--steps", "20", "--patch", "8",
                             "--stride", "6", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep == json.loads((fam / "adaptive.json").read_text())
    for name in ROUTERS:
        assert (fam / f"router-{name}.onnx").is_file()
    for f in ("adaptive.md", "adaptive.png", "adaptive_map.png"):
        assert (fam / f).is_file()
    written = [f"router-{name}.onnx" for name in ROUTERS] + ["adaptive.json", "adaptive.md", "adaptive.png",
                                                             "adaptive_map.png"]
    assert json.loads((fam / FAMILY).read_text())["files"] == {  # what `engine FAMILY` checks them against
        f: hashlib.sha256((fam / f).read_bytes()).hexdigest() for f in written}

    names = [c["name"] for c in rep["candidates"]]
    assert names == ["bicubic", "b0.40", "b0.70", "dense"]
    costs = [c["cost"] for c in rep["candidates"]]
    assert 0 < costs[0] < costs[1] < costs[2] < costs[3] == 1.0
    points = {(p["name"], p["kind"]): p for p in rep["points"]}
    assert len(points) == len(rep["points"]) == 2 * len(names) + len(ROUTERS)
    for n in names:
        whole, patched = points[(n, "whole image")], points[(n, "patches")]
        assert whole["cost"] == pytest.approx(costs[names.index(n)])
        assert patched["cost"] > whole["cost"]  # the overlap is paid for
        assert math.isfinite(whole["psnr_y"]) and math.isfinite(patched["psnr_y"])
    overlap = {n: points[(n, "patches")]["cost"] / points[(n, "whole image")]["cost"] for n in names}
    assert max(overlap.values()) == pytest.approx(min(overlap.values()))  # one grid for every candidate
    dense_patches = points[("dense", "patches")]["cost"]
    for name in ROUTERS:
        p = points[(name, "router")]
        assert 0 < p["cost"] <= dense_patches
        assert len(p["share"]) == len(names) and sum(p["share"]) == pytest.approx(1.0, abs=1e-3)
        g = rep["gaps"][name]
        assert math.isfinite(g["gap_db"]) and math.isfinite(g["gap_vs_patch_line_db"])
        assert g["psnr"] == p["psnr_y"] and g["cost"] == p["cost"]
        assert math.isfinite(g["oracle_psnr"]) and g["oracle_cost"] <= p["cost"] + 1e-6  # same MACs, not more

    # the engine stage on a family: one engine per member (dry run: no TensorRT here)
    code, out, err = run_cli(capsys, "engine", fam, "--precision", "fp32", "--dry-run")
    assert code == 0, err
    assert out.count("# family member") == 2
    assert all((fam / f / "engine" / "build.json").is_file() for f in ("b0.40", "b0.70"))
    # and one FP32 engine per router, its profile the patch count of the grid on the engine's LR sizes
    recipe = load_recipe(fam / "b0.40" / "recipe.yaml")
    assert out.count("# router ") == len(ROUTERS)
    for name in ROUTERS:
        build = json.loads((fam / "routers" / name / "engine" / "build.json").read_text())
        prof = build["settings"]["profile"]["lr_patches"]
        for level in ("min", "opt", "max"):
            n, h, w = recipe.engine.levels()[level]
            assert prof[level] == [n * len(grid(max(h, 8), max(w, 8), 8, 6)), 3, 8, 8]
        assert build["settings"]["graph"] == f"../../router-{name}.onnx"
        assert build["settings"]["precision"] == "fp32" and build["settings"]["sparse_weights"] is False
        assert "--shapes" in build["trtexec"] or "--minShapes=lr_patches:" in build["trtexec"]
