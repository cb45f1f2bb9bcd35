"""PSNR / SSIM / Y channel against values worked out by hand and against independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sls_deploy.data.metrics import psnr, rgb_to_y, ssim

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def const(h, w, value, channels=3):
    return np.full((h, w, channels), float(value))


def rand_img(seed, h=24, w=20, channels=3):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels)).astype(np.float64)


# --------------------------------------------------------------------------- Y channel


@pytest.mark.parametrize("rgb,y", [
    ((255, 255, 255), 235.0),
    ((0, 0, 0), 16.0),
    ((255, 0, 0), 16.0 + 65.481),
    ((0, 255, 0), 16.0 + 128.553),
    ((0, 0, 255), 16.0 + 24.966),
    ((51, 102, 204), 16.0 + (65.481 * 51 + 128.553 * 102 + 24.966 * 204) / 255),
])
def test_rgb_to_y_of_pure_colours(rgb, y):
    img = np.broadcast_to(np.array(rgb, dtype=np.float64), (3, 4, 3))
    out = rgb_to_y(img)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, y, rtol=0, atol=1e-9)


def test_rgb_to_y_accepts_uint8():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 255
    np.testing.assert_allclose(rgb_to_y(img), 81.481, atol=1e-9)


# --------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("d", [1, 3, 10, 100, 255])
def test_psnr_of_constant_offset(d):
    a, b = const(8, 9, 0), const(8, 9, d)
    expected = 20 * math.log10(255 / d)
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)
    assert psnr(b, a) == pytest.approx(expected, rel=1e-12)


def test_psnr_of_uint8_images_does_not_wrap_around():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)  # a - b in uint8 would be 246
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), rel=1e-12)
    assert ssim(np.zeros((12, 12, 3), np.uint8), np.full((12, 12, 3), 10, np.uint8)) == pytest.approx(
        ((2 * 0 * 10 + C1) * C2) / ((0 + 100 + C1) * C2), rel=1e-9)


def test_psnr_of_mixed_errors_matches_mse_formula():
    a = rand_img(0)
    b = a.copy()
    b[0, 0, 0] += 30
    b[5, 7, 2] -= 40
    mse = (30 ** 2 + 40 ** 2) / a.size
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12)


def test_psnr_identical_is_inf():
    a = rand_img(1)
    assert psnr(a, a.copy()) == float("inf")
    assert psnr(a, a.copy(), y_channel=True) == float("inf")


def test_psnr_crop_border_removes_the_border():
    a = rand_img(2, 20, 18)
    b = a.copy()
    border = 3
    b[:border] = 255 - b[:border]
    b[-border:] = 255 - b[-border:]
    b[:, :border] = 0
    b[:, -border:] = 0
    assert psnr(a, b) < 20  # the border error is large
    assert psnr(a, b, crop_border=border) == float("inf")
    assert psnr(a, b, crop_border=border - 1) < 30  # one pixel less crop still sees it
    # an interior error is measured over the interior pixels only
    b[10, 9, 1] = a[10, 9, 1] + 17
    n_inner = (20 - 2 * border) * (18 - 2 * border) * 3
    assert psnr(a, b, crop_border=border) == pytest.approx(10 * math.log10(255 ** 2 * n_inner / 17 ** 2),
                                                           rel=1e-12)


def test_psnr_y_channel_vs_rgb_for_a_blue_error():
    e = 40.0
    a = rand_img(3).clip(0, 200)
    b = a.copy()
    b[..., 2] += e  # blue only, everywhere
    rgb_expected = 10 * math.log10(255 ** 2 / (e ** 2 / 3))
    y_err = 24.966 * e / 255  # the luma error of a blue-only error
    y_expected = 20 * math.log10(255 / y_err)
    assert psnr(a, b) == pytest.approx(rgb_expected, rel=1e-12)
    assert psnr(a, b, y_channel=True) == pytest.approx(y_expected, rel=1e-9)
    assert psnr(a, b, y_channel=True) > psnr(a, b)  # blue hardly affects luma
    # a green error weighs more in Y than in RGB's mean
    g = a.copy()
    g[..., 1] += e
    assert psnr(a, g, y_channel=True) == pytest.approx(20 * math.log10(255 / (128.553 * e / 255)), rel=1e-9)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        psnr(const(8, 8, 0), const(8, 9, 0))
    with pytest.raises(ValueError):
        psnr(const(8, 8, 0), const(8, 8, 0, channels=1))


# --------------------------------------------------------------------------- SSIM


def ref_ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM: scipy.ndimage Gaussian (sigma 1.5, radius 5), keeping only full windows."""
    def filt(x):
        return ndimage.gaussian_filter(x, sigma=1.5, radius=5, mode="constant")[5:-5, 5:-5]

    mu1, mu2 = filt(a), filt(b)
    v1 = filt(a * a) - mu1 ** 2
    v2 = filt(b * b) - mu2 ** 2
    v12 = filt(a * b) - mu1 * mu2
    m = ((2 * mu1 * mu2 + C1) * (2 * v12 + C2)) / ((mu1 ** 2 + mu2 ** 2 + C1) * (v1 + v2 + C2))
    return float(m.mean())


def test_ssim_identical_is_one():
    a = rand_img(4)
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, a.copy(), crop_border=4, y_channel=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("mu1,mu2", [(100, 110), (0, 255), (50, 200), (128, 127)])
def test_ssim_of_constant_images_from_the_formula(mu1, mu2):
    expected = ((2 * mu1 * mu2 + C1) * C2) / ((mu1 ** 2 + mu2 ** 2 + C1) * C2)
    got = ssim(const(16, 13, mu1), const(16, 13, mu2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got < 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_an_independent_valid_window_computation(seed):
    a = rand_img(10 + seed, 27, 31)
    b = np.clip(a + np.random.default_rng(seed).normal(0, 25, a.shape), 0, 255)
    expected = np.mean([ref_ssim_channel(a[..., c], b[..., c]) for c in range(3)])
    assert ssim(a, b) == pytest.approx(expected, abs=1e-9)
    ya, yb = rgb_to_y(a[2:-2, 2:-2]), rgb_to_y(b[2:-2, 2:-2])
    assert ssim(a, b, crop_border=2, y_channel=True) == pytest.approx(ref_ssim_channel(ya, yb), abs=1e-9)


def test_ssim_matches_skimage_on_the_interior():
    """skimage reflects at the borders, then drops a 5-pixel margin of its SSIM map: the same valid windows."""
    from skimage.metrics import structural_similarity

    a = rand_img(20, 30, 26)
    b = np.clip(a * 0.8 + 20 + np.random.default_rng(5).normal(0, 15, a.shape), 0, 255)
    sk = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                               data_range=255, channel_axis=2)
    assert ssim(a, b) == pytest.approx(sk, abs=1e-6)


def test_ssim_of_rgb_is_the_mean_over_channels_and_accepts_2d():
    a, b = rand_img(30), rand_img(31)
    per_channel = [ssim(a[..., c], b[..., c]) for c in range(3)]
    assert len(set(per_channel)) == 3
    assert ssim(a, b) == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_ssim_decreases_with_noise():
    a = rand_img(40, 32, 32)
    rng = np.random.default_rng(0)
    values = [ssim(a, np.clip(a + rng.normal(0, s, a.shape), 0, 255)) for s in (2, 10, 40)]
    assert values[0] > values[1] > values[2]


def test_ssim_rejects_small_images_and_shape_mismatch():
    with pytest.raises(ValueError):
        ssim(const(10, 30, 0), const(10, 30, 0))
    with pytest.raises(ValueError):
        ssim(const(20, 20, 0), const(20, 20, 1), crop_border=5)  # 10x10 after cropping
    assert ssim(const(21, 21, 0), const(21, 21, 0), crop_border=5) == pytest.approx(1.0)  # 11x11 is enough
    with pytest.raises(ValueError):
        ssim(const(16, 16, 0), const(16, 17, 0))
