"""Building blocks shared by model families."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))); ``mid`` = conv1's out / conv2's in channels (a pruned block is narrower).

    Residual Sparsity Connection (SSL, Xia et al. 2023): with ``read`` < num_feat, conv1 reads only the stream
    channels ``read_idx`` (a Gather); with ``write`` < num_feat, conv2 gives only ``write`` channels, added back
    into the full-width stream at ``write_idx`` (index_add: ScatterElements in ONNX). The stream itself keeps
    num_feat channels. The index buffers exist only in a block that has them (a dense block's state dict is
    BasicSR's); they start as 0..k-1 and are filled with the kept channels when a model is sliced.
    """

    def __init__(self, num_feat: int, mid: int | None = None, read: int | None = None, write: int | None = None):
        super().__init__()
        mid = num_feat if mid is None else mid
        read = num_feat if read is None else read
        write = num_feat if write is None else write
        if read < num_feat:
            self.register_buffer("read_idx", torch.arange(read))
        if write < num_feat:
            self.register_buffer("write_idx", torch.arange(write))
        self.conv1 = nn.Conv2d(read, mid, 3, 1, 1)
        self.conv2 = nn.Conv2d(mid, write, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        for conv in (self.conv1, self.conv2):  # BasicSR's init: default scaled by 0.1, so the stack starts stable
            with torch.no_grad():
                conv.weight.mul_(0.1)
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read_idx, write_idx = getattr(self, "read_idx", None), getattr(self, "write_idx", None)
        y = self.conv2(self.relu(self.conv1(x if read_idx is None else x.index_select(1, read_idx))))
        return x + y if write_idx is None else x.index_add(1, write_idx, y)
