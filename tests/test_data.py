"""Image lists, image reading, LR generation and aligned patch sampling."""

from __future__ import annotations

import hashlib

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from sls_deploy.data.images import bicubic_down, load_pair, read_rgb, to_image, to_tensor
from sls_deploy.data.patches import PatchSampler
from sls_deploy.data.sources import resolve_images
from conftest import data_error


def write_random(path, h, w, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels else (h, w)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    iio.imwrite(path, img)
    return img


# --------------------------------------------------------------------------- image lists


def test_builtin_lists_exist_and_are_disjoint():
    train, evl = resolve_images("skimage:train"), resolve_images("skimage:eval")
    assert len(train) >= 5 and len(evl) >= 2
    assert all(p.is_file() for p in train + evl)
    assert len(set(train)) == len(train) and len(set(evl)) == len(evl)
    assert not {p.name for p in train} & {p.name for p in evl}
    assert not {p.resolve() for p in train} & {p.resolve() for p in evl}
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(p) for p in train} & {digest(p) for p in evl}  # no same image under two names


def test_stereo_pair_is_not_split():
    train = {p.name for p in resolve_images("skimage:train")}
    evl = {p.name for p in resolve_images("skimage:eval")}
    pair = {"motorcycle_left.png", "motorcycle_right.png"}
    assert pair <= train or pair <= evl or not (pair & (train | evl))
    assert not (pair & train and pair & evl)


def test_builtin_images_are_readable_rgb():
    for p in resolve_images("skimage:eval"):
        img = read_rgb(p)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and min(img.shape[:2]) >= 64


@pytest.mark.parametrize("spec", ["skimage:foo", "skimage:", "skimage:Train"])
def test_unknown_builtin_list(spec):
    assert spec in data_error(resolve_images, spec)


def test_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data_error(resolve_images, empty)
    assert "nope" in data_error(resolve_images, tmp_path / "nope")
    (empty / "notes.txt").write_text("x")
    (empty / "sub.png").mkdir()  # a folder named like an image
    data_error(resolve_images, empty)
    write_random(empty / "b.PNG", 8, 8)
    write_random(empty / "a.jpg", 8, 8)
    assert [p.name for p in resolve_images(empty)] == ["a.jpg", "b.PNG"]
    assert resolve_images(str(empty / "a.jpg")) == [empty / "a.jpg"]


# --------------------------------------------------------------------------- read_rgb


def test_read_gray_replicates_channels(tmp_path):
    gray = write_random(tmp_path / "g.png", 7, 9, channels=0)
    img = read_rgb(tmp_path / "g.png")
    assert img.shape == (7, 9, 3) and img.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray.astype(np.float32) / 255)


def test_read_rgba_drops_alpha(tmp_path):
    rgba = write_random(tmp_path / "a.png", 6, 5, channels=4)
    img = read_rgb(tmp_path / "a.png")
    assert img.shape == (6, 5, 3)
    np.testing.assert_array_equal(img, rgba[..., :3].astype(np.float32) / 255)


def test_read_gray_alpha_drops_alpha(tmp_path):
    from PIL import Image

    la = np.random.default_rng(3).integers(0, 256, size=(6, 7, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert iio.imread(tmp_path / "la.png").shape == (6, 7, 2)
    img = read_rgb(tmp_path / "la.png")
    assert img.shape == (6, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], la[..., 0].astype(np.float32) / 255)


def test_read_palette_image(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(4).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"),
                                  np.asarray(pal.convert("RGB")).astype(np.float32) / 255)


def test_read_rgb_uint8_and_uint16(tmp_path):
    rgb = write_random(tmp_path / "c.png", 5, 4)
    np.testing.assert_array_equal(read_rgb(tmp_path / "c.png"), rgb.astype(np.float32) / 255)
    deep = np.arange(5 * 4, dtype=np.uint16).reshape(5, 4) * 3000  # 16-bit gray (Pillow writes no 16-bit RGB)
    iio.imwrite(tmp_path / "d.png", deep)
    assert iio.imread(tmp_path / "d.png").dtype == np.uint16
    np.testing.assert_allclose(read_rgb(tmp_path / "d.png"), np.repeat(deep[..., None], 3, 2) / 65535.0,
                               rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio probing its legacy plugins
def test_read_corrupt_and_missing(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    assert "bad.png" in data_error(read_rgb, bad)
    half = tmp_path / "half.png"
    write_random(half, 32, 32)
    half.write_bytes(half.read_bytes()[:60])
    assert "half.png" in data_error(read_rgb, half)
    assert "missing.png" in data_error(read_rgb, tmp_path / "missing.png")


def test_tensor_roundtrip():
    img = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    t = to_tensor(img)
    assert t.shape == (1, 3, 5, 7)
    assert t[0, 2, 1, 3] == img[1, 3, 2]
    np.testing.assert_array_equal(to_image(t), img)
    assert to_image(torch.full((3, 2, 2), 2.0)).max() == 1.0  # clipped


# --------------------------------------------------------------------------- LR generation


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_down_of_constant_is_constant(value, scale):
    hr = torch.full((1, 3, 12 * scale, 10 * scale), value)
    lr = bicubic_down(hr, scale)
    assert lr.shape == (1, 3, 12, 10)
    torch.testing.assert_close(lr, torch.full_like(lr, value), rtol=0, atol=1e-6)


def test_bicubic_down_stays_in_range():
    hr = (torch.rand(1, 3, 32, 32) > 0.5).float()  # a harsh pattern overshoots with bicubic weights
    lr = bicubic_down(hr, 2)
    assert lr.min() >= 0.0 and lr.max() <= 1.0


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_load_pair_mod_crops(tmp_path, scale):
    path = tmp_path / "odd.png"
    img = write_random(path, 23, 17)
    hr, lr = load_pair(path, scale)
    h, w = 23 - 23 % scale, 17 - 17 % scale
    assert hr.shape == (1, 3, h, w)
    assert lr.shape == (1, 3, h // scale, w // scale)
    assert hr.shape[-2] == scale * lr.shape[-2] and hr.shape[-1] == scale * lr.shape[-1]
    np.testing.assert_array_equal(to_image(hr), img[:h, :w].astype(np.float32) / 255)  # top-left kept
    torch.testing.assert_close(lr, bicubic_down(hr, scale))


def test_load_pair_smaller_than_scale(tmp_path):
    write_random(tmp_path / "tiny.png", 3, 9)
    assert "tiny.png" in data_error(load_pair, tmp_path / "tiny.png", 4)


# --------------------------------------------------------------------------- patch sampling


def _d4(x: np.ndarray, t: int) -> np.ndarray:
    """The 8 flips/rotations of the last two axes."""
    y = np.rot90(x, t % 4, axes=(-2, -1))
    return y[..., ::-1] if t >= 4 else y


def _locate(lr: np.ndarray, hr: np.ndarray, lp: np.ndarray, hp: np.ndarray, s: int):
    """All (y, x, t) where the LR patch is transform t of lr's window at (y, x) and the HR patch is the same
    transform of hr's aligned window."""
    p = lp.shape[-1]
    windows = sliding_window_view(lr, (p, p), axis=(1, 2))  # (3, ny, nx, p, p)
    found = []
    for t in range(8):
        hits = np.argwhere((_d4(windows, t) == lp[:, None, None]).all(axis=(0, 3, 4)))
        for y, x in hits:
            region = hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
            found.append((int(y), int(x), t, bool(np.array_equal(_d4(region, t), hp))))
    return found


@pytest.fixture
def two_images(tmp_path):
    write_random(tmp_path / "a.png", 30, 26, seed=1)
    write_random(tmp_path / "b.png", 21, 34, seed=2)
    return [tmp_path / "a.png", tmp_path / "b.png"]


@pytest.mark.parametrize("scale", [2, 3])
def test_patches_have_the_right_shapes_and_are_aligned(two_images, scale):
    p, bsz = 4, 6
    sampler = PatchSampler(two_images, scale, p, bsz, seed=3)
    pairs = [load_pair(f, scale) for f in two_images]
    transforms = set()
    for _ in range(12):
        lrb, hrb = sampler.batch()
        assert lrb.shape == (bsz, 3, p, p) and hrb.shape == (bsz, 3, p * scale, p * scale)
        assert lrb.is_contiguous() and hrb.is_contiguous()
        for lp, hp in zip(lrb.numpy(), hrb.numpy()):
            found = []
            for hr, lr in pairs:
                found += _locate(lr[0].numpy(), hr[0].numpy(), lp, hp, scale)
            assert len(found) == 1, found  # random images: the LR patch occurs once, in one orientation
            y, x, t, hr_aligned = found[0]
            assert hr_aligned, (y, x, t)
            transforms.add(t)
    assert transforms == set(range(8))  # flips and rotations all occur (72 samples)


def test_same_seed_same_batches_and_set_state(two_images):
    a = PatchSampler(two_images, 2, 4, 3, seed=7)
    b = PatchSampler(two_images, 2, 4, 3, seed=7)
    c = PatchSampler(two_images, 2, 4, 3, seed=8)
    ba, bb, bc = a.batch(), b.batch(), c.batch()
    assert torch.equal(ba[0], bb[0]) and torch.equal(ba[1], bb[1])
    assert not torch.equal(ba[0], bc[0])

    state = a.state()
    seq = [a.batch() for _ in range(3)]
    a.batch()  # move on
    a.set_state(state)
    again = [a.batch() for _ in range(3)]
    for (l1, h1), (l2, h2) in zip(seq, again):
        assert torch.equal(l1, l2) and torch.equal(h1, h2)
    # a state carried to a fresh sampler (a resumed run) continues the same sequence
    fresh = PatchSampler(two_images, 2, 4, 3, seed=0)
    fresh.set_state(state.clone())
    for l1, h1 in seq:
        l2, h2 = fresh.batch()
        assert torch.equal(l1, l2) and torch.equal(h1, h2)


def test_image_smaller_than_a_patch_names_the_file(tmp_path):
    write_random(tmp_path / "big.png", 40, 40, seed=1)
    write_random(tmp_path / "small_one.png", 20, 40, seed=2)  # LR 10x20 at x2
    msg = data_error(PatchSampler, [tmp_path / "big.png", tmp_path / "small_one.png"], 2, 12, 2)
    assert "small_one.png" in msg
    PatchSampler([tmp_path / "small_one.png"], 2, 10, 2)  # exactly one patch high is enough


def test_patch_sampler_rejects_bad_sizes_and_no_files(two_images):
    data_error(PatchSampler, two_images, 2, 0, 2)
    data_error(PatchSampler, two_images, 2, 4, 0)
    data_error(PatchSampler, [], 2, 4, 2)


def test_cmyk_jpeg_is_converted_to_rgb_and_reported_truthfully(tmp_path):
    from PIL import Image

    from sls_deploy.data.images import conversion_note, read_rgb

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)  # red left, blue right
    rgb[:, 8:] = (30, 30, 200)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=100)
    got = read_rgb(path)
    assert got.shape == (16, 16, 3)
    assert np.abs(got[4, 2] * 255 - (200, 30, 30)).max() < 20 and np.abs(got[4, 13] * 255 - (30, 30, 200)).max() < 20
    assert conversion_note(path) == "CMYK, converted to RGB (Pillow)"


def test_oversized_calibration_and_eval_images_are_refused_before_decoding(tmp_path):
    from PIL import Image

    from sls_deploy.core.errors import DataError
    from sls_deploy.data.images import check_pixels
    from sls_deploy.data.calibration import read_calibration_images

    big = tmp_path / "calib" / "big.png"
    big.parent.mkdir()
    Image.new("RGB", (1100, 1000)).save(big)
    with pytest.raises(DataError, match=r"calibration image big.png is 1100x1000 \(1.0 MP\), above the limit of 1.0 MP"):
        read_calibration_images(big.parent, 8)
    with pytest.raises(DataError, match="eval image big.png is 1100x1000"):
        check_pixels(big, 2**20, "eval image")
    check_pixels(big, 2 * 2**20, "eval image")  # under the limit: fine


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_rgb_shows_the_image_as_pillow_exif_transpose_does(tmp_path, orientation):
    from PIL import Image, ImageOps

    from sls_deploy.data.images import conversion_note, image_size, read_rgb

    stored = Image.fromarray((np.random.default_rng(orientation).random((5, 8, 3)) * 255).astype(np.uint8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    stored.save(path, exif=exif)  # lossless, so every pixel can be compared
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im))
    got = np.round(read_rgb(path) * 255).astype(np.uint8)
    assert np.array_equal(got, want)
    assert image_size(path) == (want.shape[1], want.shape[0])
    note = conversion_note(path)
    assert (note is None) if orientation == 1 else note.startswith(f"rotated per its EXIF orientation ({orientation}: ")


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, i = [], 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        chunks.append((data[i + 4:i + 8], data[i:i + 12 + n]))
        i += 12 + n
    return chunks


@pytest.mark.parametrize("exif_place", ["none", "before pixels", "after pixels"])
def test_the_exif_orientation_is_read_from_the_header_without_decoding_the_png(tmp_path, monkeypatch, exif_place):
    """A training folder is scanned by header before step 1: Pillow's PNG getexif() decodes the whole image to
    find an eXIf chunk (~0.4 s per DIV2K image); the chunk is found wherever libpng allows it, nothing decoded."""
    from PIL import Image, ImageOps, PngImagePlugin

    from sls_deploy.data.images import probe, read_rgb

    stored = Image.fromarray((np.random.default_rng(0).random((5, 8, 3)) * 255).astype(np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "o.png"
    stored.save(path, **({} if exif_place == "none" else {"exif": exif}))
    if exif_place == "after pixels":  # move the eXIf chunk Pillow wrote before IDAT to just before IEND
        chunks = _png_chunks(path.read_bytes())
        order = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")] + [c for c in chunks if c[0] == b"eXIf"]
        path.write_bytes(path.read_bytes()[:8] + b"".join(c[1] for c in order + [chunks[-1]]))
        assert [c[0] for c in _png_chunks(path.read_bytes())][-3:] == [b"IDAT", b"eXIf", b"IEND"]
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("decoded")

    with monkeypatch.context() as m:
        m.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
        info = probe(path)
    assert (info.orientation, info.width, info.height) == ((1, 8, 5) if exif_place == "none" else (6, 5, 8))
    assert np.array_equal(np.round(read_rgb(path) * 255).astype(np.uint8), want)


def test_read_rgb_reads_a_camera_mpo_as_its_primary_image_and_refuses_animations(tmp_path):
    from PIL import Image

    from sls_deploy.data.images import read_rgb

    primary, preview = Image.new("RGB", (16, 12), (200, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 200))
    primary.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "camera.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
    img = read_rgb(tmp_path / "camera.jpg")
    assert img.shape == (12, 16, 3) and img[..., 0].min() > 0.7 and img[..., 2].max() < 0.1
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    assert "anim.webp holds 2 frames" in data_error(read_rgb, tmp_path / "anim.webp")
