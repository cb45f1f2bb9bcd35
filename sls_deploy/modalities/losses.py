"""Losses for video SR clips (N, T, C, H, W).

Pruning error grows along a recurrence, so plain per-frame L1 lets late (forward branch) or early (backward
branch) frames drift. ``temporal_l1`` adds a temporal-consistency term: L1 between the frame-to-frame changes of
the output and of the ground truth, which penalises flicker and drift wherever in the clip it appears and
treats both propagation directions alike (unlike a weight on late frames, which suits a forward-only model).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def temporal_l1(weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """L1 over all frames + ``weight`` * L1 of the temporal differences (weight 0: plain per-frame L1)."""

    def loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        base = F.l1_loss(sr, hr)
        if weight == 0 or sr.dim() != 5 or sr.shape[1] < 2:
            return base
        return base + weight * F.l1_loss(sr[:, 1:] - sr[:, :-1], hr[:, 1:] - hr[:, :-1])

    return loss
