"""`sls-deploy upscale`: tiling is exact where the overlap covers the receptive field, the CLI writes one output
per input (images and videos), and bad inputs are one-line errors that write nothing."""

from __future__ import annotations

import json

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import build_tiny_2to4_bundle, error_line, run_cli
from sls_deploy.models.edsr import EDSR
from sls_deploy.upscale.tiling import tile_count, upscale_tiled, windows

# tiny EDSR (2 blocks): conv_first + 4 block convs + conv_after_body + upsample.0 at LR (7 px), upsample.2 at 2x and
# conv_last at 4x (< 1 LR px): receptive radius 8 LR pixels
RADIUS = 8


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return EDSR(scale=4, num_feat=16, num_block=2).eval()


def _infer(model):
    @torch.no_grad()
    def infer(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()
    return infer


def test_windows_cover_the_image_once():
    h, w, tile = 37, 50, 16
    cover = np.zeros((h, w), int)
    for win in windows(h, w, tile, 5):
        cover[win.y0:win.y1, win.x0:win.x1] += 1
        assert win.cy0 == max(0, win.y0 - 5) and win.cx1 == min(w, win.x1 + 5)
    assert (cover == 1).all() and len(windows(h, w, tile, 5)) == tile_count(h, w, tile) == 12


@pytest.mark.parametrize("tile", [8, 13])
def test_tiled_equals_untiled_when_overlap_covers_the_receptive_field(tiny_model, tile):
    rng = np.random.default_rng(0)
    img = rng.random((30, 37, 3), dtype=np.float32)
    full = np.clip(_infer(tiny_model)(img.transpose(2, 0, 1)[None].copy())[0].transpose(1, 2, 0), 0, 1)
    out = np.empty((120, 148, 3), np.float32)
    upscale_tiled(img, _infer(tiny_model), 4, tile, RADIUS, out)
    assert np.abs(out - full).max() < 1e-5


def test_a_small_overlap_differs_only_near_the_seams(tiny_model):
    rng = np.random.default_rng(0)
    img = rng.random((60, 70, 3), dtype=np.float32)
    full = np.clip(_infer(tiny_model)(img.transpose(2, 0, 1)[None].copy())[0].transpose(1, 2, 0), 0, 1)
    small = upscale_tiled(img, _infer(tiny_model), 4, 24, 2, np.empty((240, 280, 3), np.float32))
    diff = np.abs(small - full).max(axis=2)
    far = np.ones((60, 70), bool)  # at least RADIUS LR pixels from every seam
    for seam in (24, 48):
        far[max(0, seam - RADIUS):seam + RADIUS] = False
        far[:, max(0, seam - RADIUS):seam + RADIUS] = False
    far_hr = np.repeat(np.repeat(far, 4, 0), 4, 1)
    assert far_hr.any() and diff[far_hr].max() < 1e-3
    assert diff.max() > 1e-5  # the seams do differ: the overlap matters


def test_uint8_output_is_the_rounded_float_output(tiny_model):
    img = np.random.default_rng(1).random((12, 16, 3), dtype=np.float32)
    f = upscale_tiled(img, _infer(tiny_model), 4, 8, RADIUS, np.empty((48, 64, 3), np.float32))
    u = upscale_tiled(img, _infer(tiny_model), 4, 8, RADIUS, np.empty((48, 64, 3), np.uint8))
    assert np.array_equal(u, np.round(f * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    return build_tiny_2to4_bundle(tmp_path_factory.mktemp("up"), tiny_images)


def test_upscale_images_on_every_backend_agree(bundle, tiny_images, tmp_path, capsys):
    src = sorted(tiny_images["eval"].glob("*.png"))
    outs = {}
    for backend in ("ort", "torch"):
        code, stdout, err = run_cli(capsys, "upscale", bundle, *src, "-o", tmp_path / backend, "--backend",
                                    backend, "--tile", "16", "--overlap", "12", "--json", "--no-progress")
        assert code == 0, err
        records = json.loads(stdout)
        assert [r["output"] for r in records] == [str(tmp_path / backend / p.name) for p in src]
        outs[backend] = [iio.imread(r["output"]) for r in records]
        for r, o in zip(records, outs[backend]):
            w, h = r["input_size"]
            assert o.shape == (h * 4, w * 4, 3) and o.dtype == np.uint8
    for a, b in zip(outs["ort"], outs["torch"]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # FP32 ONNX Runtime vs PyTorch, rounding only
    code, _, err = run_cli(capsys, "upscale", bundle, src[0], "-o", tmp_path / "f16", "--precision", "fp16",
                           "--no-progress")
    assert code == 0, err and (tmp_path / "f16" / src[0].name).is_file()


def test_upscale_video_keeps_frame_count_and_fps(bundle, tmp_path, capsys):
    rng = np.random.default_rng(2)
    src = tmp_path / "clip.mp4"
    with iio2.get_writer(str(src), "ffmpeg", fps=12, codec="libx264", macro_block_size=1,
                         ffmpeg_log_level="error") as w:
        for _ in range(5):
            w.append_data((rng.random((20, 24, 3)) * 255).astype(np.uint8))
    code, stdout, err = run_cli(capsys, "upscale", bundle, src, "-o", tmp_path / "o", "--tile", "16", "--json",
                                "--no-progress")
    assert code == 0, err
    rec = json.loads(stdout)[0]
    assert rec["frames"] == 5 and rec["fps"] == 12
    with iio2.get_reader(rec["output"], "ffmpeg") as r:
        assert r.count_frames() == 5 and r.get_meta_data()["fps"] == 12
        assert r.get_meta_data()["size"] == (96, 80)
    assert [p.name for p in (tmp_path / "o").glob(".*")] == [".sls-upscale.json"]  # no temporary file left
    record = json.loads((tmp_path / "o" / ".sls-upscale.json").read_text())["outputs"]
    assert set(record) == {"clip.mp4"} and len(record["clip.mp4"]) == 64  # the sha256 of the output upscale wrote


def test_bad_inputs_are_one_line_errors_that_write_nothing(bundle, tiny_images, tmp_path, capsys):
    good = sorted(tiny_images["eval"].glob("*.png"))[0]
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not a png")
    odd = tmp_path / "notes.txt"
    odd.write_text("x")
    as_file = tmp_path / "file_out"
    as_file.write_text("keep me")
    cases = [
        ((good, tmp_path / "missing.png"), tmp_path / "o1", [], "input not found", 1),
        ((good, corrupt), tmp_path / "o2", [], "cannot read image", 1),
        ((good, odd), tmp_path / "o3", [], "unsupported extension '.txt'", 2),
        ((good,), as_file, [], "is a regular file; give a folder", 2),
        ((good,), tmp_path / "o5", ["--tile", "4"], "smaller than the model's minimum input", 2),
        ((good,), tmp_path / "o6", ["--backend", "torch", "--precision", "int8"], "FP32 weights only", 2),
    ]
    for inputs, out, extra, fragment, rc in cases:
        code, _, err = run_cli(capsys, "upscale", bundle, *inputs, "-o", out, *extra, "--no-progress")
        assert code == rc and fragment in error_line(err), (fragment, err)
        assert not (out.is_dir() and any(out.iterdir()))
    assert as_file.read_text() == "keep me"
    code, _, err = run_cli(capsys, "upscale", tmp_path / "nobundle", good, "-o", tmp_path / "o7")
    assert code == 1 and "bundle not found" in error_line(err)
