"""PSNR and SSIM as BasicSR defines them (crop_border, optional Y channel of BT.601).

Inputs are HWC arrays in [0, 255] (use ``images.quantize`` on model outputs first, as BasicSR does when
it writes 8-bit images). Y is the "studio swing" luma: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import correlate2d


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HWC RGB in [0, 255] -> HxW luma in [16, 235] (BT.601, as MATLAB's rgb2ycbcr)."""
    img = np.asarray(img, dtype=np.float64) / 255.0
    return 16.0 + img @ np.array([65.481, 128.553, 24.966])


def _prepare(img1: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool):
    if img1.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img1.shape} vs {img2.shape}")
    a, b = np.asarray(img1, np.float64), np.asarray(img2, np.float64)
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return a, b


def psnr(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    a, b = _prepare(img1, img2, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * np.log10(255.0 * 255.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(ax ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    win = _gaussian_window()

    def filt(x):  # 'valid' filtering == BasicSR's cv2.filter2D(...)[5:-5, 5:-5]
        return correlate2d(x, win, mode="valid")

    mu1, mu2 = filt(a), filt(b)
    mu1_sq, mu2_sq, mu12 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    s1, s2, s12 = filt(a * a) - mu1_sq, filt(b * b) - mu2_sq, filt(a * b) - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def ssim(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    a, b = _prepare(img1, img2, crop_border, y_channel)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 after cropping, got {a.shape[1]}x{a.shape[0]}")
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))
