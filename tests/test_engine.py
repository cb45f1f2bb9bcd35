"""Engine stage without TensorRT: Polygraphy config objects, dry run, missing-TensorRT error, pack/unpack with
hash checks, and the per-layer parser on a documented-schema fixture."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sls_deploy.cli import main
from sls_deploy.trt.engine import engine_settings, polygraphy_loaders, trtexec_command
from sls_deploy.config.recipe import resolve_recipe
from sls_deploy.trt.layers import layer_report

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None,
                                reason="these tests cover the machine without TensorRT")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    from tests.conftest import write_tiny_recipe, write_tiny_weights

    tmp = tmp_path_factory.mktemp("eng")
    recipe = write_tiny_recipe(tmp, tiny_images,
                               engine={"min": [1, 8, 8], "opt": [1, 45, 80], "max": [2, 90, 160]})
    weights = write_tiny_weights(recipe, tmp / "w.safetensors")
    out = tmp / "b"
    assert main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.6", "--method",
                 "oneshot", "--out", str(out), "--no-progress"]) == 0
    return out


def test_config_objects_from_recipe():
    recipe = resolve_recipe("edsr", None)
    s = engine_settings(recipe, "fp16", "enable")
    network, config, engine = polygraphy_loaders(s, Path("/nonexistent"), trt_major=10)
    assert config.sparse_weights is True and config.fp16 is True and not config.int8
    (profile,) = config.profiles
    assert str(profile) == "{lr [min=(1, 3, 32, 32), opt=(1, 3, 180, 320), max=(1, 3, 270, 480)]}"
    _, config11, _ = polygraphy_loaders(s, Path("/nonexistent"), trt_major=11)
    assert not config11.fp16 and not config11.int8  # strongly typed: precision comes from the graph
    s8 = engine_settings(recipe, "int8", "disable", workspace_mb=512)
    _, c8, _ = polygraphy_loaders(s8, Path("/nonexistent"), trt_major=10)
    assert c8.int8 and c8.fp16 and c8.sparse_weights is False
    cmd = trtexec_command(s8, 11)
    assert "--stronglyTyped" in cmd and "--int8" not in cmd and "--sparsity=disable" in cmd
    assert "--memPoolSize=workspace:512M" in cmd


def test_network_loader_needs_tensorrt(bundle):
    from polygraphy.backend.trt import NetworkFromOnnxPath

    with pytest.raises(Exception, match="tensorrt"):
        NetworkFromOnnxPath(str(bundle / "model.onnx"))()


def test_dry_run_writes_build_json(bundle, capsys):
    assert main(["engine", str(bundle), "--dry-run", "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=model.int8.onnx" in out and "polygraphy convert model.int8.onnx" in out
    info = json.loads((bundle / "engine" / "build.json").read_text())
    assert info["dry_run"] and info["settings"]["opt_shape"] == [1, 3, 45, 80]
    assert info["settings"]["max_shape"] == [2, 3, 90, 160] and info["tensorrt_major"] is None


@pytest.mark.parametrize("argv", [["engine"], ["validate", "--backend", "trt"]])
def test_missing_tensorrt_is_one_line_and_writes_nothing(bundle, capsys, argv):
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    assert main([argv[0], str(bundle), *argv[1:]]) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "TensorRT was not found" in lines[0] and "JetPack" in lines[0]
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_pack_round_trip_and_tamper_check(bundle, tmp_path, capsys):
    tar = tmp_path / "dev.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0
    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert {"pack.json", "plan.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "calib_cache.json",
            "recipe.yaml", "manifest.json", "val/astronaut.png"} <= names
    assert "model.safetensors" not in names  # a device needs graphs, not training weights
    assert main(["engine", str(tar), "--dry-run"]) == 0  # unpacks beside the tar, checks every hash
    root = tmp_path / "dev"
    meta = json.loads((root / "pack.json").read_text())
    assert meta["opset"] == 17 and meta["onnx"] and meta["recipe_digest"]
    # tamper with a packed graph: refused
    data = bytearray((root / "model.fp16.onnx").read_bytes())
    data[-5] ^= 0xFF
    (root / "model.fp16.onnx").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["engine", str(root), "--dry-run"]) == 1
    assert "does not match its recorded sha256" in capsys.readouterr().err


def test_folder_bundle_with_tampered_graph_is_refused(bundle, capsys, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "model.int8.onnx").write_bytes(b"changed")
    assert main(["engine", str(copy), "--dry-run", "--precision", "int8"]) == 1
    assert "sha256" in capsys.readouterr().err


def test_layers_json_parser_on_fixture():
    inspector = json.loads((FIXTURES / "trt_inspector_edsr_sample.json").read_text())
    log = (FIXTURES / "trt_build_log_sample.txt").read_text()
    plan_layers = [{"name": "body.0.conv1", "n": 2, "m": 4, "sparse_2to4": True},
                   {"name": "body.0.conv2", "n": 2, "m": 4, "sparse_2to4": True},
                   {"name": "upsample.0", "n": 3, "m": 4, "sparse_2to4": False},
                   {"name": "body.1.conv1", "n": 2, "m": 4, "sparse_2to4": True}]
    nodes = {"body.0.conv1": "/body/body.0/conv1/Conv", "body.0.conv2": "/body/body.0/conv2/Conv",
             "upsample.0": "/upsample/upsample.0/Conv"}
    rows = {r["name"]: r for r in layer_report(plan_layers, nodes, inspector, log)}
    assert rows["body.0.conv1"]["trt_eligible"] and rows["body.0.conv1"]["trt_picked_sparse"]
    assert "sparse" in rows["body.0.conv1"]["tactic"]
    assert rows["body.0.conv2"]["trt_eligible"] and not rows["body.0.conv2"]["trt_picked_sparse"]
    assert rows["upsample.0"]["trt_eligible"] and not rows["upsample.0"]["weights_2to4"]
    assert rows["body.1.conv1"]["onnx_node"] is None and not rows["body.1.conv1"]["trt_eligible"]
