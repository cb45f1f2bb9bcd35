"""Validation a deploying engineer can trust: every deployment shape, latency side by side, the report files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
import torch

from sls_deploy.cli import main
from sls_deploy.data.images import pair_at_size, read_rgb
from sls_deploy.core.errors import ValidationError
from sls_deploy.backends.latency import time_side_by_side
from sls_deploy.stages.build import reopen
from sls_deploy.trt.outlook import layer_outlook
from sls_deploy.report.plots import tradeoff_points
from sls_deploy.backends.runners import Limits, check_shapes
from sls_deploy.backends.runtime import ort_infer
from sls_deploy.stages.validate import ValidateOptions, check_report, run_validate

from conftest import build_tiny_2to4_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images) -> Path:
    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("v"), tiny_images)


def test_pair_at_size_crops_exactly_and_mirror_extends(tiny_images):
    f = next(tiny_images["eval"].iterdir())
    img = read_rgb(f)
    hr, lr, ext = pair_at_size(f, 4, (8, 8))  # 32x32 HR from a 64x64 image: a plain centre crop
    assert not ext and hr.shape == (1, 3, 32, 32) and lr.shape == (1, 3, 8, 8)
    H, W = img.shape[:2]
    y, x = (H - 32) // 2, (W - 32) // 2
    assert np.allclose(hr[0].permute(1, 2, 0).numpy(), img[y:y + 32, x:x + 32])
    hr, lr, ext = pair_at_size(f, 4, (30, 41))  # larger than the image: mirror-extended to exactly 120x164
    assert ext and hr.shape == (1, 3, 120, 164) and lr.shape == (1, 3, 30, 41)


def _id(x):
    return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")


def test_check_shapes_flags_drop_tolerance_and_shape(tiny_images):
    files = sorted(tiny_images["eval"].iterdir())
    noisy = lambda x: _id(x) + 0.05 * torch.randn(1, 3, x.shape[2] * 4, x.shape[3] * 4, generator=torch.Generator().manual_seed(0))  # noqa: E731
    wrong = lambda x: _id(x)[:, :, :-1]  # noqa: E731
    limits = {"fp32": Limits(0.05, 1e-4), "fp16": Limits(0.1), "int8": Limits(0.5)}
    rows = check_shapes(_id, {"same": ("fp32", _id), "noisy": ("fp16", noisy), "cut": ("int8", wrong)}, files, 4,
                        [("min", (8, 8)), ("odd", (7, 11))], "y", limits)
    by = {(r.backend, r.label): r for r in rows}
    assert len(rows) == 6
    assert by["same", "min"].passed and by["same", "min"].max_abs == 0 and by["same", "odd"].output_shape == (1, 3, 28, 44)
    assert not by["noisy", "odd"].passed and "PSNR drop" in by["noisy", "odd"].failures[0]
    assert by["noisy", "odd"].psnr_drop > 0.1
    assert not by["cut", "min"].passed and "output shape" in by["cut", "min"].failures[0]
    # an FP32 backend is also held to the absolute tolerance
    tight = check_shapes(_id, {"n": ("fp32", noisy)}, files, 4, [("min", (8, 8))], "y",
                         {"fp32": Limits(100.0, 1e-4)})
    assert any("max abs" in f for f in tight[0].failures)


def test_side_by_side_timing_interleaves_and_counts():
    order = []
    res = time_side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=2, runs=4)
    assert order[:4] == ["a", "b", "a", "b"]  # warm-up
    assert order[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # alternating order, one of each per round
    assert [len(t.runs_ms) for t in res.values()] == [4, 4]
    assert res["a"].p90_ms >= res["a"].median_ms >= 0


def test_prediction_rules():
    assert layer_outlook([64, 64, 3, 3], "fp32", True)[0] == "no"  # an FP32 island never gets a sparse kernel
    assert layer_outlook([256, 256, 3, 3], "fp16/int8", True)[0] == "likely"
    # TensorRT issues #3849/#4065: sparse pays from ~256 in and out channels; #1403: 64->64 3x3 eligible, not picked
    assert layer_outlook([64, 64, 3, 3], "fp16/int8", True)[0] == "unlikely"
    assert layer_outlook([256, 64, 3, 3], "fp16/int8", True)[0] == "unlikely"  # < 256 input channels
    assert layer_outlook([16, 16, 3, 3], "fp16/int8", True)[0] == "unlikely"
    assert layer_outlook([512, 512, 1, 1], "fp16/int8", True)[0] == "unlikely"  # 1x1 conv
    assert layer_outlook([512, 512], "fp16/int8", True)[0] == "unlikely"  # Linear / Gemm
    assert layer_outlook([256, 256, 3, 3], "fp16/int8", False)[0] == "no"


def test_report_has_shapes_latency_prediction_and_html(bundle):
    rep = json.loads((bundle / "report.json").read_text())
    rows = rep["shapes"]
    assert {r["backend"] for r in rows} == {"onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8"}
    assert [r["label"] for r in rows if r["precision"] == "fp32"] == ["min", "opt", "max", "odd", "extra"]
    assert all(r["output_shape"] == [1, 3, 4 * r["lr_hw"][0], 4 * r["lr_hw"][1]] for r in rows)
    assert all(r["passed"] for r in rows if r["precision"] == "fp32")
    lat = rep["latency"]["sizes"][0]
    assert lat["lr_hw"] == [16, 24] and lat["dense"]["runs"] == 3 and lat["pruned"]["runs"] == 3
    assert lat["ratio_pruned_over_dense"] == pytest.approx(lat["pruned"]["median_ms"] / lat["dense"]["median_ms"])
    assert rep["latency"]["threads"] >= 1
    assert (bundle / "work" / "dense.onnx").is_file()
    pred = rep["prediction"]
    assert pred["bound_all_2to4_halved"] == pytest.approx(rep["macs"]["trt_2to4_ratio"])
    assert "not a measurement" in pred["label"]
    html = (bundle / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "Accuracy at every deployment shape" in html and "Latency, dense vs pruned" in html
    md = (bundle / "report.md").read_text()
    assert "Predicted TensorRT benefit (a prediction)" in md and "report_tradeoff.png" in md


def test_tradeoff_collects_sibling_bundles(bundle, tmp_path):
    rep = json.loads((bundle / "report.json").read_text())
    root = tmp_path / "runs"
    mine = root / "mine"
    shutil.copytree(bundle, mine, ignore=shutil.ignore_patterns("work"))
    other = root / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps({**rep, "method": "sls", "budget": 0.3,
                                                   "macs": {**rep["macs"], "ratio": 0.3}}))
    stranger = root / "stranger"
    stranger.mkdir()
    (stranger / "report.json").write_text(json.dumps({**rep, "model": "something-else"}))
    (root / "broken").mkdir()
    (root / "broken" / "report.json").write_text("{not json")
    pts = tradeoff_points(rep, mine)
    assert [(p["bundle"], p["this"]) for p in pts] == [("mine", True), ("other", False)]


def test_gray_and_rgba_eval_images_are_converted_with_a_note(bundle, tmp_path, tiny_images):
    folder = tmp_path / "mixed"
    folder.mkdir()
    src = (read_rgb(next(tiny_images["eval"].iterdir())) * 255).astype(np.uint8)
    iio.imwrite(folder / "gray.png", src[:, :, 0])
    iio.imwrite(folder / "rgba.png", np.dstack([src, np.full(src.shape[:2], 255, np.uint8)]))
    rep = run_validate(reopen(bundle, lambda s: None, eval_data=str(folder)),
                       ValidateOptions(latency=False))
    assert rep["notes"] == ["gray.png: grayscale, replicated to RGB", "rgba.png: RGBA: alpha dropped"]
    assert rep["latency"] == {"skipped": "--no-latency"}
    assert "Input notes" in (bundle / "report.md").read_text()


def test_torch_backend_and_failing_check_exit_nonzero(bundle, capsys):
    assert main(["validate", str(bundle), "--backend", "torch", "--no-latency", "--json", "--no-progress"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {r["backend"] for r in rep["shapes"]} == {"pytorch fp32"}
    assert all(r["max_abs"] == 0 for r in rep["shapes"])
    failing = json.loads(json.dumps(rep))
    failing["shapes"][2]["passed"] = False
    failing["shapes"][2]["failures"] = ["PSNR drop 0.700 dB > 0.5 dB"]
    with pytest.raises(ValidationError, match=r"pytorch fp32 at max 24x32: PSNR drop 0.700 dB > 0.5 dB"):
        check_report(failing)


def test_bad_backend_value_and_graph_without_input(bundle, tmp_path):
    assert main(["validate", str(bundle), "--backend", "tensorflow"]) == 2
    g = onnx.load(str(bundle / "model.onnx"))
    g.graph.input[0].name = "image"
    for node in g.graph.node:
        node.input[:] = ["image" if i == "lr" else i for i in node.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(g, str(path))
    with pytest.raises(ValidationError, match="has no input 'lr'"):
        with ort_infer(path):
            pass


def test_trt_backend_runs_shape_checks_and_times_sparse_vs_dense(bundle, tmp_path):
    """The TensorRT path with the engine opener replaced by ONNX Runtime on the FP16 graph (no TensorRT here)."""
    from sls_deploy.stages.validate_engine import validate_engine
    from sls_deploy.config.recipe import load_recipe

    root = tmp_path / "dev"
    shutil.copytree(bundle, root, ignore=shutil.ignore_patterns("work"))
    (root / "engine").mkdir(exist_ok=True)
    (root / "engine" / "model.plan").write_bytes(b"stand-in")
    (root / "engine" / "model.dense.plan").write_bytes(b"stand-in")
    recipe = load_recipe(root / "recipe.yaml")

    from sls_deploy.backends.runtime import onnx_runner

    def fake_engine(path):  # a runner like TrtRunner: ONNX Runtime on the FP16 graph stands in for the engine
        return onnx_runner(root / "model.fp16.onnx")

    res = validate_engine(root, recipe, "fp16", None, runs=2, open_engine=fake_engine)
    assert res["passed"] and [r["label"] for r in res["shapes"]] == ["min", "opt", "max", "odd", "extra"]
    assert res["latency"][0]["sparse"]["runs"] == 2 and "ratio_sparse_over_dense" in res["latency"][0]
    assert json.loads((root / "engine" / "validate.json").read_text())["passed"]

    class broken_engine:  # the runner interface, returning black images
        def __init__(self, path):
            self.inner = onnx_runner(root / "model.fp16.onnx")

        def activate(self):
            self.inner.activate()

        def deactivate(self):
            self.inner.deactivate()

        def get_input_metadata(self, **kw):
            return self.inner.get_input_metadata(**kw)

        def infer(self, feed):
            lr = feed["lr"]
            return {"sr": np.zeros((1, 3, lr.shape[2] * 4, lr.shape[3] * 4), np.float32)}

    res = validate_engine(root, recipe, "fp16", None, runs=1, open_engine=broken_engine)
    assert not res["passed"] and res["verdict"].startswith("tensorrt fp16 at min 8x8: PSNR drop")


def test_engine_layers_json_adds_trt_columns(bundle, tmp_path):
    root = tmp_path / "withengine"
    shutil.copytree(bundle, root)
    rep = json.loads((root / "report.json").read_text())
    names = [l["name"] for l in rep["layers"]]
    (root / "engine").mkdir(exist_ok=True)
    (root / "engine" / "layers.json").write_text(json.dumps(
        [{"name": n, "trt_eligible": True, "trt_picked_sparse": i == 0} for i, n in enumerate(names)]))
    rep = run_validate(reopen(root, lambda s: None), ValidateOptions(latency=False))
    assert rep["layers"][0]["trt_picked_sparse"] is True and rep["layers"][1]["trt_picked_sparse"] is False
    assert "| TRT eligible | TRT picked sparse |" in (root / "report.md").read_text()


def test_dense_engine_build_writes_separate_files(bundle):
    from sls_deploy.trt.engine import engine_settings, trtexec_command
    from sls_deploy.config.recipe import load_recipe

    recipe = load_recipe(bundle / "recipe.yaml")
    dense = engine_settings(recipe, "fp16", "disable")
    assert dense.engine_file == "engine/model.dense.plan" and dense.out_name("layers.json") == "layers.dense.json"
    assert "--exportLayerInfo=engine/inspector.dense.json" in trtexec_command(dense, 10)
    assert engine_settings(recipe, "fp16", "enable").engine_file == "engine/model.plan"
