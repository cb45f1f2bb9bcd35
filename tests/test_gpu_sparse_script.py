"""benchmarks/gpu_sparse.py on CPU: layer shapes from an ONNX graph, the 2:4 helper, the no-CUDA JSON, bad files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CHECKOUT

SCRIPT = CHECKOUT / "benchmarks" / "gpu_sparse.py"


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_sparse_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Tiny(nn.Module):
    """x2 SR net: LR convs (one narrow, Cin not a multiple of 4, one strided), PixelShuffle, one HR conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.narrow = nn.Conv2d(8, 5, 3, padding=1)
        self.down = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.up = nn.Conv2d(6, 8 * 4, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.narrow(torch.relu(self.head(x)))
        y = self.shuffle(self.up(torch.relu(self.down(y))))
        return self.tail(nn.functional.interpolate(y, scale_factor=2.0, mode="nearest"))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gs") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tiny().eval(), (torch.rand(1, 3, 12, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["lr"], output_names=["sr"],
                          dynamic_axes={"lr": {0: "batch", 2: "height", 3: "width"},
                                        "sr": {0: "batch", 2: "oh", 3: "ow"}})
    return path


def test_extract_layers_shapes(gs, tiny_onnx):
    rows, skipped = gs.extract_layers(tiny_onnx, 64, 48, 2)  # output 64x48 (W x H) at x2: LR 32x24
    assert skipped == []
    got = {r["layer"]: (r["cin"], r["cout"], r["k"], r["out_hw"], r["gemm_mnk"]) for r in rows}
    assert got == {
        "head": (3, 8, [3, 3], [24, 32], [8, 27, 24 * 32]),
        "narrow": (8, 5, [3, 3], [24, 32], [5, 72, 24 * 32]),
        "down": (5, 6, [3, 3], [12, 16], [6, 45, 12 * 16]),
        "up": (6, 32, [1, 1], [12, 16], [32, 6, 12 * 16]),
        "tail": (8, 3, [3, 3], [48, 64], [3, 72, 48 * 64]),
    }


def test_gemm_layout_and_2to4(gs):
    w = torch.randn(6, 8, 3, 3).numpy()
    a = gs.gemm_weight(w)
    assert a.shape == (6, 3 * 3 * 8)
    for o, c, i, j in [(0, 0, 0, 0), (5, 7, 2, 1), (3, 4, 1, 2)]:
        assert a[o, (i * 3 + j) * 8 + c] == w[o, c, i, j]  # reduction ordered (kh, kw, Cin)
    p = gs.prune_2to4(a)
    groups = p.reshape(6, -1, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    # the kept two are the largest |w| of each 4 input channels at one tap
    kept = groups.abs().sort(-1).values[..., 2:]
    assert torch.equal(kept, a.reshape(6, -1, 4).abs().sort(-1).values[..., 2:])
    assert gs.is_2to4(p) and not gs.is_2to4(a)
    assert torch.equal(gs.prune_2to4(p), p)  # already 2:4: unchanged
    # Cin=3 is zero-padded to 4 per tap, so groups never straddle two taps
    a3 = gs.gemm_weight(torch.randn(2, 3, 3, 3).numpy())
    assert a3.shape == (2, 36) and (a3.reshape(2, 9, 4)[..., 3] == 0).all()


def test_main_without_cuda_writes_not_measured(gs, tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    rc = gs.main(["--onnx", str(tiny_onnx), "--synthetic", "--out-size", "64x48", "--scale", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert "no CUDA" in data["reason"] and "not TensorRT" in data["label"]
    assert len(data["rows"]) == 5 + 6 and not list(tmp_path.glob("*.tmp"))
    for row in data["rows"]:
        assert all(row[f] == "not measured" for f in ("dense_ms", "sparse_ms", "ratio", "max_abs_diff"))
        assert "not TensorRT" in row["label"]
    assert all(t["dense_ms"] == "not measured" for t in data["totals"].values())
    assert "not measured" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--onnx", "/nonexistent/model.onnx"], ["--onnx", __file__]])
def test_bad_onnx_file_one_line_error(tmp_path, args):
    r = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_usage_errors_exit_2(gs):
    for argv in ([], ["--synthetic", "--out-size", "100x7"], ["--synthetic", "--out-size", "big"]):
        with pytest.raises(SystemExit) as e:
            gs.main(argv)
        assert e.value.code == 2
