"""The runtime layer (backends/runtime.py, sessions.py, loading.py): a bundle's graph of every precision, or its
engine, opened for a backend as a runner.

Its outputs are compared with the path every caller took before the layer existed, a plain
``onnxruntime.InferenceSession`` on the CPU provider, built here by the test. The layer's sessions run the same
CPU kernels with other memory and thread settings, so outputs must agree to within ``TOL`` (float32 rounding
of a reordered sum; measured equal here). The PyTorch reference agrees with the FP32 graph within the tiny
recipe's ``validate.fp32_atol`` (1e-4).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import build_tiny_2to4_bundle, error_line, run_cli
from sls_deploy.backends import runtime, sessions
from sls_deploy.backends.loading import bundle_module, graph_spec
from sls_deploy.config.recipe import load_recipe
from sls_deploy.core.bundle import GRAPH_FILES, RECIPE
from sls_deploy.core.errors import BackendMissingError, BundleError, ValidationError
from sls_deploy.core.vocabulary import ORT, PRECISIONS, TRT

TOL = 1e-6  # layer vs a plain InferenceSession: the same kernels on the same CPU


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("rt"), tiny_images)


def _lr(seed: int = 0, h: int = 12, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)


def _plain(path, feed: dict) -> np.ndarray:
    """The path before the runtime layer: InferenceSession on the CPU provider, default options."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0], dtype=np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_opens_and_matches_a_plain_session(bundle, precision):
    spec = graph_spec(load_recipe(bundle / RECIPE))
    name, out = spec.input_names[0], spec.output_names[0]
    runner, dtype = runtime.open_runner(bundle, ORT, precision, name)
    assert dtype == np.float32  # the tiny recipe's FP16 graph keeps FP32 I/O
    x = _lr()
    want = _plain(bundle / GRAPH_FILES[precision], {name: x})
    with runner:
        got = np.asarray(runner.infer({name: x})[out], dtype=np.float32)
    assert got.shape == (1, 3, 48, 40)
    assert np.abs(got - want).max() <= TOL
    with runtime.onnx_runner(bundle / GRAPH_FILES[precision]) as check:  # the checks' ShrinkingSession
        assert np.abs(np.asarray(check.infer({name: x})[out]) - want).max() <= TOL
    with runtime.ort_infer(bundle / GRAPH_FILES[precision], name, out) as infer:
        assert np.abs(infer(torch.from_numpy(x)) - want).max() <= TOL


def test_the_sessions_of_every_use_agree(bundle):
    path = bundle / GRAPH_FILES["fp32"]
    name = graph_spec(load_recipe(bundle / RECIPE)).input_names[0]
    feed = {name: _lr(1, 9, 13)}
    want = _plain(path, feed)
    timed, threads = sessions.timed_session(path, 1)
    assert threads == 1
    outs = [timed.run(None, feed)[0], sessions.cpu_session(path.read_bytes()).run(None, feed)[0],
            sessions.tile_session(path).run(None, feed)[0], sessions.ShrinkingSession(path).run(None, feed)[0]]
    sessions.release_shared_arena([timed], feed)
    for o in outs:
        assert np.abs(np.asarray(o) - want).max() <= TOL


def test_the_torch_reference_matches_the_fp32_graph(bundle):
    recipe = load_recipe(bundle / RECIPE)
    spec = graph_spec(recipe)
    x = _lr(2)
    with torch.no_grad():
        ref = bundle_module(bundle, recipe)(torch.from_numpy(x)).numpy()
    assert np.abs(ref - _plain(bundle / GRAPH_FILES["fp32"], {spec.input_names[0]: x})).max() <= 1e-4


def test_a_missing_graph_or_engine_is_a_one_line_bundle_error(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / GRAPH_FILES["int8"]).unlink()
    with pytest.raises(BundleError) as e:
        runtime.open_runner(copy, ORT, "int8", "lr")
    assert str(e.value) == (f"{copy} has no model.int8.onnx (export it with `sls-deploy export {copy} "
                            "--precision int8`)")
    with pytest.raises(BundleError) as e:
        runtime.EngineFromBundle(copy)()
    assert str(e.value) == f"{copy} has no engine/model.plan (build it with `sls-deploy engine {copy}`)"
    with pytest.raises(ValidationError, match="^ONNX file not found: "):
        runtime.onnx_runner(copy / "nothing.onnx")


def test_a_corrupt_graph_is_a_one_line_validation_error(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / GRAPH_FILES["fp16"]).write_bytes(b"\x08\x07not an onnx graph")
    for opening in (lambda: runtime.open_runner(copy, ORT, "fp16", "lr"),
                    lambda: runtime.onnx_runner(copy / GRAPH_FILES["fp16"])):
        with pytest.raises(ValidationError) as e:
            opening()
        assert str(e.value).startswith(f"cannot read {copy / GRAPH_FILES['fp16']} as ONNX (corrupt?): ")
        assert "\n" not in str(e.value)


@pytest.mark.skipif(_has_tensorrt(), reason="checks the error without TensorRT")
def test_trt_without_tensorrt_is_the_clear_error(bundle, tiny_images, tmp_path, capsys):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    for opening in (lambda: runtime.trt_runner(engine), lambda: runtime.open_runner(bundle, TRT, "fp16", "lr")):
        with pytest.raises(BackendMissingError, match="TensorRT"):
            opening()
    picture = sorted(tiny_images["eval"].glob("*.png"))[0]
    code, _, err = run_cli(capsys, "upscale", bundle, picture, "-o", tmp_path / "o", "--backend", "trt",
                           "--no-progress")
    assert code == 1 and "TensorRT" in error_line(err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
