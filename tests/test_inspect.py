"""`sls-deploy inspect` on our graphs (FP32 / FP16 / INT8) and on a foreign ONNX model."""

from __future__ import annotations

import json

import pytest
import torch

from sls_deploy.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    from conftest import build_tiny_2to4_bundle

    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("insp"), tiny_images)


def _rows(capsys, *args):
    capsys.readouterr()
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return {r["layer"]: r for r in json.loads(capsys.readouterr().out)}


def test_inspect_bundle_graphs(bundle, capsys):
    plan = json.loads((bundle / "plan.json").read_text())
    fp32 = _rows(capsys, bundle, "--size", "24x32")
    for l in plan["layers"]:  # every planned 2:4 layer is seen as 2:4, MACs match the hand formula
        r = fp32[l["name"]]
        assert r["is_2to4"] and r["max_nonzeros_per_4"] == 2 and r["precision"] == "fp32"
        o, i, kh, kw = l["weight_shape"]
        scale_h = {"upsample.2": 2}.get(l["name"], 1)  # upsample.2 runs at 2x the LR size
        assert r["macs"] == o * i * kh * kw * 24 * 32 * scale_h ** 2
    assert not fp32["conv_first"]["is_2to4"] or fp32["conv_first"]["max_nonzeros_per_4"] is None
    int8 = _rows(capsys, bundle / "model.int8.onnx")
    fp16 = _rows(capsys, bundle / "model.fp16.onnx")
    for l in plan["layers"]:
        assert int8[l["name"]]["is_2to4"] and fp16[l["name"]]["is_2to4"]  # seen through DQ and Cast
    assert int8["body.0.conv1"]["precision"] == "int8" and int8["conv_first"]["precision"] == "fp32"
    assert fp16["body.0.conv1"]["precision"] == "fp16" and fp16["conv_last"]["precision"] == "fp32"
    assert int8["body.0.conv1"]["macs"] is None  # no --size: no MACs


def test_inspect_foreign_model(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    path = tmp_path / "foreign.onnx"
    h, w = torch.export.Dim("h", min=4, max=64), torch.export.Dim("w", min=4, max=64)
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(path), dynamo=True, opset_version=18,
                      input_names=["x"], dynamic_shapes=({2: h, 3: w},), external_data=False)
    rows = _rows(capsys, path, "--size", "10x12")
    assert rows["0"]["macs"] == 8 * 3 * 9 * 10 * 12 and rows["2"]["macs"] == 4 * 8 * 10 * 12
    assert rows["2"]["is_2to4"] is False  # dense 8-channel 1x1 conv


@pytest.mark.parametrize("args, code, fragment", [(["--size", "abc"], 2, "HxW"), (["--size", "0x4"], 2, "positive")])
def test_inspect_bad_size(bundle, capsys, args, code, fragment):
    assert main(["inspect", str(bundle), *args]) == code
    assert fragment in capsys.readouterr().err


def test_inspect_missing_and_corrupt(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.onnx")]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert main(["inspect", str(bad)]) == 1
    assert "cannot read" in capsys.readouterr().err
