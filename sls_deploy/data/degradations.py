"""Degradations: how a model's input is made from a ground-truth image, and the baseline it must beat.

An adapter declares its degradation (``ModelAdapter.degradation``): super-resolution models use
``BicubicDown(scale)`` (the anti-aliased bicubic downscale of ``images.bicubic_down``, baseline bicubic
upscaling), the deblurring model ``Blur`` (a Gaussian or linear-motion kernel, reflect border, baseline the
blurred input itself). Evaluation pairs (``images.load_pair``) and training patches (``PatchSampler``) are both
made by the declared degradation, and reports label the baseline with its ``name``.

Randomness: a ``random_per_patch`` degradation draws a fresh kernel for every training patch from the
sampler's seeded generator (so a resumed run draws the same kernels); for evaluation each image gets a
deterministic kernel derived from the degradation's ``seed`` and the image's file name (``eval_seed``).
"""

from __future__ import annotations

import abc
import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sls_deploy.core.errors import DataError
from sls_deploy.data.resize import bicubic_down, bicubic_up, to_tensor


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator (used as is), an int seed, or None (fresh OS entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class Degradation(abc.ABC):
    """HR image -> model input, and the baseline (``baseline(degrade(hr))`` has the HR size) to beat.

    ``name`` labels the baseline in reports ("bicubic", "blurred input"); ``scale`` is HR size / input size.
    """

    name: str = ""
    scale: int = 1
    # True: training draws a new random degradation per patch (the sampler degrades HR crops with a margin of
    # ``context()`` HR pixels); False: the whole image's input is computed once and crops are aligned with it.
    random_per_patch: bool = False
    seed: int = 0  # evaluation kernels derive from this and the image name

    @abc.abstractmethod
    def degrade_tensor(self, hr: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        """1x3xHxW HR tensor in [0, 1] -> 1x3x(H/scale)x(W/scale) input tensor in [0, 1]."""

    @abc.abstractmethod
    def baseline(self, lr: torch.Tensor) -> torch.Tensor:
        """The trivial restoration of an input (NCHW) at the output size."""

    def degrade(self, hr: np.ndarray, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """HWC float32 [0, 1] HR array -> HWC float32 input array (``rng``: a Generator, a seed, or None)."""
        lr = self.degrade_tensor(to_tensor(hr), rng)
        return np.ascontiguousarray(lr[0].permute(1, 2, 0).numpy())

    def context(self) -> int:
        """HR pixels around a pixel that its degraded value depends on (a multiple of ``scale``)."""
        return 0

    def eval_seed(self, key: str) -> int:
        """The deterministic seed of one evaluation image (``key``: its file name)."""
        return zlib.crc32(f"{self.seed}:{key}".encode())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


@dataclass(frozen=True)
class BicubicDown(Degradation):
    """The standard SR degradation: anti-aliased bicubic downscale by ``scale``; baseline bicubic upscale."""

    scale: int = 4
    name = "bicubic"

    def __post_init__(self):
        if int(self.scale) < 1:
            raise DataError(f"scale must be >= 1, not {self.scale}")

    def degrade_tensor(self, hr: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        return bicubic_down(hr, self.scale)

    def baseline(self, lr: torch.Tensor) -> torch.Tensor:
        return bicubic_up(lr, self.scale)

    def context(self) -> int:
        """The anti-aliased bicubic kernel reaches 2 input pixels, ``2 * scale`` HR pixels."""
        return 2 * self.scale

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "bicubic_down", "scale": self.scale}


# --------------------------------------------------------------------------- blur kernels

BLUR_KINDS = ("gaussian", "motion")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Isotropic Gaussian, (2*ceil(3 sigma)+1)^2 taps, sum 1."""
    if sigma <= 0:
        raise DataError(f"Gaussian sigma must be > 0, not {sigma}")
    r = max(1, math.ceil(3.0 * sigma))
    ax = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(ax ** 2) / (2.0 * sigma ** 2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """A straight motion-blur segment of ``length`` pixels through the centre at ``angle`` radians,
    rasterised with bilinear weights (odd size, sum 1, symmetric under a 180-degree rotation)."""
    if length < 1:
        raise DataError(f"motion length must be >= 1, not {length}")
    r = math.ceil((length - 1) / 2.0) + 1
    size = 2 * r + 1
    k = np.zeros((size, size), dtype=np.float64)
    n = max(2, int(math.ceil(length * 8)))
    t = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, n)
    xs, ys = r + t * math.cos(angle), r + t * math.sin(angle)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), w)
    k = (k + k[::-1, ::-1]) / 2.0  # exactly centro-symmetric, so convolution = correlation
    return (k / k.sum()).astype(np.float32)


def blur_tensor(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Depthwise blur of an NCHW tensor with one odd-sized kernel, reflect border, same size out."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    if x.shape[-2] <= ph or x.shape[-1] <= pw:
        raise DataError(f"image {x.shape[-1]}x{x.shape[-2]} is too small for a {kw}x{kh} blur kernel "
                        "(reflect border)")
    c = x.shape[1]
    w = torch.from_numpy(np.ascontiguousarray(kernel)).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(F.pad(x, (pw, pw, ph, ph), mode="reflect"), w, groups=c)


@dataclass(frozen=True)
class Blur(Degradation):
    """Gaussian (sigma uniform in ``sigma``) or linear motion blur (length uniform in ``motion_len``, angle
    uniform in [0, pi)), the kind chosen uniformly from ``kinds``; reflect border; optional additive Gaussian
    noise of standard deviation ``noise`` (in [0, 1] units), then clipped to [0, 1]. Same size out (scale 1);
    the baseline is the blurred input itself."""

    kinds: tuple[str, ...] = BLUR_KINDS
    sigma: tuple[float, float] = (0.8, 2.0)
    motion_len: tuple[float, float] = (5.0, 11.0)
    noise: float = 0.0
    seed: int = 0
    name = "blurred input"
    scale = 1
    random_per_patch = True

    def __post_init__(self):
        kinds = tuple(self.kinds)
        if not kinds or any(k not in BLUR_KINDS for k in kinds):
            raise DataError(f"blur kinds must be a non-empty subset of {', '.join(BLUR_KINDS)}, not {list(kinds)}")
        for label, (lo, hi), least in (("sigma", self.sigma, 0.0), ("motion_len", self.motion_len, 1.0)):
            if not least <= lo <= hi or (label == "sigma" and lo <= 0):
                raise DataError(f"blur {label} must be [low, high] with {'0 <' if label == 'sigma' else '1 <='} "
                                f"low <= high, not {[lo, hi]}")
        if not 0 <= self.noise < 1:
            raise DataError(f"blur noise must be in [0, 1), not {self.noise}")

    def sample_kernel(self, rng: np.random.Generator | int | None) -> tuple[str, np.ndarray]:
        """(kind, kernel) drawn from ``rng``."""
        rng = as_rng(rng)
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind == "gaussian":
            return kind, gaussian_kernel(float(rng.uniform(*self.sigma)))
        return kind, motion_kernel(float(rng.uniform(*self.motion_len)), float(rng.uniform(0.0, math.pi)))

    def degrade_tensor(self, hr: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        rng = as_rng(rng)
        _, kernel = self.sample_kernel(rng)
        out = blur_tensor(hr, kernel)
        if self.noise > 0:
            noise = rng.standard_normal(out.shape).astype(np.float32) * np.float32(self.noise)
            out = out + torch.from_numpy(noise)
        return out.clamp_(0.0, 1.0)

    def baseline(self, lr: torch.Tensor) -> torch.Tensor:
        return lr

    def context(self) -> int:
        """The largest kernel radius this blur can draw."""
        radii = []
        if "gaussian" in self.kinds:
            radii.append(max(1, math.ceil(3.0 * self.sigma[1])))
        if "motion" in self.kinds:
            radii.append(math.ceil((self.motion_len[1] - 1) / 2.0) + 1)
        return max(radii)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "blur", "scale": 1, "kinds": list(self.kinds), "sigma": list(self.sigma),
                "motion_len": list(self.motion_len), "noise": self.noise, "seed": self.seed}


def blur_from_options(kinds: Sequence[str] | str = BLUR_KINDS, sigma: Sequence[float] = (0.8, 2.0),
                      motion_len: Sequence[float] = (5.0, 11.0), noise: float = 0.0, seed: int = 0) -> Blur:
    """A ``Blur`` from recipe-style values (lists; a single kind may be a string). Raises DataError."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(str(k) for k in kinds)
    ranges = {}
    for what, value in (("sigma", sigma), ("motion_len", motion_len)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise DataError(f"blur {what} must be [low, high], not {value!r}")
        ranges[what] = (float(value[0]), float(value[1]))
    return Blur(kinds=kinds, sigma=ranges["sigma"], motion_len=ranges["motion_len"], noise=float(noise),
                seed=int(seed))


def default_degradation(scale: int, degradation: Degradation | None) -> Degradation:
    """``degradation``, or bicubic downscaling by ``scale`` when None; raises when their scales differ."""
    if degradation is None:
        return BicubicDown(int(scale))
    if degradation.scale != scale:
        raise DataError(f"the {degradation.name} degradation has scale {degradation.scale}, not {scale}")
    return degradation


__all__ = ["BLUR_KINDS", "BicubicDown", "Blur", "Degradation", "as_rng", "blur_from_options", "blur_tensor",
           "default_degradation", "gaussian_kernel", "motion_kernel"]
