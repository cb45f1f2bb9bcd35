"""Building blocks shared by model families."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))); ``mid`` = conv1's out / conv2's in channels (a pruned block is narrower)."""

    def __init__(self, num_feat: int, mid: int | None = None):
        super().__init__()
        mid = num_feat if mid is None else mid
        self.conv1 = nn.Conv2d(num_feat, mid, 3, 1, 1)
        self.conv2 = nn.Conv2d(mid, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        for conv in (self.conv1, self.conv2):  # BasicSR's init: default scaled by 0.1, so the stack starts stable
            with torch.no_grad():
                conv.weight.mul_(0.1)
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))
