"""FP16 graph with FP32 islands and INT8 Q/DQ graph: structure, patterns through Cast/DQ, calibration, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sls_deploy.cli import main
from sls_deploy.onnx.export import graph_weights, weight_is_2to4
from sls_deploy.onnx.precision.int8 import calibrate, quantized_inputs

ISLANDS = {"conv_first", "upsample.2", "conv_last"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    """One tiny oneshot 2:4 build with all three graphs, shared by the structural tests."""
    from conftest import build_tiny_2to4_bundle

    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("prec"), tiny_images)


def _conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {w.tensor[: -len(".weight")]: w.values for w in graph_weights(model) if w.tensor.endswith(".weight")}


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"lr": x.astype(np.float16 if "float16" in sess.get_inputs()[0].type else np.float32)})[0]


def test_fp16_graph_keeps_islands_fp32_with_casts_at_borders(bundle):
    m = onnx.load(str(bundle / "model.fp16.onnx"))
    weights = _conv_weights(m)
    assert set(weights) >= ISLANDS | {"body.0.conv1", "upsample.0"}
    for name, w in weights.items():
        assert w.dtype == (np.float32 if name in ISLANDS else np.float16), name
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert 2 <= len(casts) <= 4  # only at island borders, not around every block
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).random((1, 3, 12, 10)).astype(np.float32)
    np.testing.assert_allclose(_run(bundle / "model.fp16.onnx", x), _run(bundle / "model.onnx", x), atol=5e-3)


def test_int8_graph_quantizes_non_islands_and_keeps_zeros(bundle):
    m = onnx.load(str(bundle / "model.int8.onnx"))
    fp32 = _conv_weights(onnx.load(str(bundle / "model.onnx")))
    q = _conv_weights(m)
    for name, w in q.items():
        if name in ISLANDS:
            assert w.dtype == np.float32, name
            continue
        assert w.dtype == np.int8, name
        assert np.array_equal(w == 0, fp32[name] == 0), name  # a zero stays a zero, nothing else becomes one
        assert np.abs(w).max() == 127  # per-channel symmetric: the largest weight maps to +-127
    dq = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    for conv in convs:
        producer = {o: n for n in m.graph.node for o in n.output}.get(conv.input[0])
        name = next((k for k in q if conv.input[1].startswith(k + ".weight")), None)
        quantized = name is not None and name not in ISLANDS
        assert (producer is not None and producer.op_type == "DequantizeLinear") == quantized, conv.name
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node) and dq
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any() for n in dq.values())  # zp 0


def test_every_graph_keeps_the_planned_2to4_pattern(bundle):
    from polygraphy.tools.sparse import SparsityPruner

    plan = json.loads((bundle / "plan.json").read_text())
    planned = {l["name"] for l in plan["layers"] if l["sparse_2to4"]}
    for f in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        m = onnx.load(str(bundle / f))
        ours = {w.tensor[: -len(".weight")] for w in graph_weights(m) if weight_is_2to4(w)}
        assert planned <= ours, f
        if f != "model.int8.onnx":  # Polygraphy skips INT8 initializers; for float graphs it must agree
            pruner = SparsityPruner(m)
            pruner.check()
            assert {t[: -len(".weight")] for t in pruner.sparse_tensors} == ours, f


def test_report_lists_every_precision(bundle):
    rep = json.loads((bundle / "report.json").read_text())
    assert set(rep["precisions"]) == {"fp32", "fp16", "int8"}
    p = rep["precisions"]
    assert p["fp32"]["max_abs_vs_torch_fp32"] < 1e-4
    assert p["fp16"]["psnr_vs_torch_fp32"] > p["int8"]["psnr_vs_torch_fp32"] > 25
    assert (bundle / "calib_cache.json").is_file()


def test_io_fp16(bundle, capsys):
    assert main(["export", str(bundle), "--precision", "fp16", "--io", "fp16"]) == 0
    m = onnx.load(str(bundle / "model.fp16.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    out = _run(bundle / "model.fp16.onnx", np.random.default_rng(1).random((1, 3, 9, 9)))
    assert out.dtype == np.float16 and out.shape == (1, 3, 36, 36)


def test_calibration_methods_and_reproducibility(bundle):
    m = onnx.load(str(bundle / "model.onnx"))
    tensors = list(quantized_inputs(m, sorted(ISLANDS)).values())
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 16, 16)).astype(np.float32) for _ in range(3)]
    mx = calibrate(m, "lr", images, tensors, "max")
    pc = calibrate(m, "lr", images, tensors, "percentile", 99.0)
    en = calibrate(m, "lr", images, tensors, "entropy")
    assert all(0 < pc[t] <= mx[t] + 1e-6 and 0 < en[t] <= mx[t] + 1e-6 for t in tensors)
    assert any(pc[t] < mx[t] for t in tensors)
    assert calibrate(m, "lr", images, tensors, "entropy") == en  # same images, same scales


def test_calibration_cache_is_reused_then_invalidated(bundle, capsys):
    manifest = lambda: json.loads((bundle / "manifest.json").read_text())  # noqa: E731
    assert main(["export", str(bundle), "--precision", "int8", "--calib-method", "max"]) == 0
    assert manifest()["stages"]["export"]["result"]["calibration"]["reused_cache"] is False
    cache = json.loads((bundle / "calib_cache.json").read_text())
    assert cache["key"]["method"] == "max"
    assert main(["export", str(bundle), "--precision", "int8", "--precision", "fp16", "--calib-method", "max"]) == 0
    assert manifest()["stages"]["export"]["result"]["calibration"]["reused_cache"] is True
    assert json.loads((bundle / "calib_cache.json").read_text()) == cache


@pytest.mark.parametrize("kind, fragment", [("empty", "holds no images"), ("garbage", "cannot read image"),
                                            ("small", "smaller than the model's minimum input"),
                                            ("missing", "calibration folder not found")])
def test_bad_calibration_folder_writes_nothing(bundle, tmp_path, capsys, kind, fragment):
    import imageio.v3 as iio

    folder = tmp_path / "calib"
    if kind != "missing":
        folder.mkdir()
    if kind == "garbage":
        (folder / "a.png").write_bytes(b"not a png")
    if kind == "small":
        iio.imwrite(folder / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    before = {f.name: f.read_bytes() for f in bundle.iterdir() if f.suffix == ".onnx"}
    code = main(["export", str(bundle), "--precision", "int8", "--calib", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and fragment in err and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in bundle.iterdir() if f.suffix == ".onnx"} == before


def test_unknown_precision_is_usage_error(bundle, capsys):
    assert main(["export", str(bundle), "--precision", "int4"]) == 2
    assert "'int4' is not one of" in capsys.readouterr().err


def test_island_matching_no_layer(tmp_path, tiny_recipe, tiny_weights, capsys):
    import yaml

    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["precision"] = {"fp32_islands": ["conv_first", "upsample.9"]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["build", "--recipe", str(path), "--weights", str(tiny_weights), "--budget", "0.5",
                 "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "'upsample.9' matches no layer" in err
    assert not (tmp_path / "b" / "plan.json").exists()
