"""Tensor/image conversion and bicubic resizing: the lowest layer of data/, shared by images and degradations."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC [0,1] array -> 1x3xHxW float tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).unsqueeze(0).float()


def to_image(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """1x3xHxW (or 3xHxW) -> HWC float array clipped to [0, 1]."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if a.ndim == 4:
        a = a[0]
    return np.clip(a.transpose(1, 2, 0), 0.0, 1.0).astype(np.float32)


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Anti-aliased bicubic downscale (like MATLAB imresize / PIL), the standard SR degradation."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    return lr.clamp_(0.0, 1.0)


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline every SR model must beat."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
