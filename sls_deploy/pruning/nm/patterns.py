"""N:M fine-grained structured sparsity: masks, checks and eligibility.

Groups are M consecutive entries along the reduction axis, the axis TensorRT and NVIDIA ASP use:
- conv weight (Cout, Cin, kh, kw): M consecutive input channels at each (out, kh, kw) position;
- linear weight (Cout, Cin): M consecutive input features of each output row.
Inside a group the N entries of largest magnitude are kept (ties broken by position, lowest first), so a
mask follows deterministically from the weights and (N, M).
"""

from __future__ import annotations

import numpy as np
import torch

VALID_M = (4, 8, 16, 32)


def grouped(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View as (..., Cin // m, m) with the reduction axis last."""
    if weight.dim() == 4:
        w = weight.permute(0, 2, 3, 1)  # O, kh, kw, I
    elif weight.dim() == 2:
        w = weight
    else:
        raise ValueError(f"N:M groups are defined for conv (4-D) and linear (2-D) weights, not {weight.dim()}-D")
    cin = w.shape[-1]
    if cin % m:
        raise ValueError(f"reduction axis of length {cin} is not a multiple of M={m}")
    return w.reshape(*w.shape[:-1], cin // m, m)


def ungrouped(grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        o, i, kh, kw = like.shape
        return grouped.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return grouped.reshape(like.shape).contiguous()


def check_nm_args(n: int, m: int) -> None:
    if m not in VALID_M:
        raise ValueError(f"M must be one of {VALID_M}, not {m}")
    if not 1 <= n <= m:
        raise ValueError(f"N must be in 1..{m} for M={m}, not {n}")


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the N largest-|w| entries of every group of M along the reduction axis."""
    check_nm_args(n, m)
    g = grouped(weight.detach().abs().float(), m)
    order = torch.argsort(g, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return ungrouped(keep, weight)


def max_nonzeros_per_group(weight: torch.Tensor | np.ndarray, m: int) -> int:
    """The largest number of non-zeros found in any group of M (0 for an all-zero weight)."""
    w = torch.from_numpy(np.array(weight)) if isinstance(weight, np.ndarray) else weight.detach()
    return int((grouped(w, m) != 0).sum(-1).max())


def is_nm(weight: torch.Tensor | np.ndarray, n: int, m: int) -> bool:
    """True when every group of M along the reduction axis holds at most N non-zeros."""
    return max_nonzeros_per_group(weight, m) <= n


def is_2to4(weight: torch.Tensor | np.ndarray) -> bool:
    """The pattern TensorRT accelerates: at most 2 non-zeros in every 4 consecutive input channels."""
    shape = weight.shape
    cin = shape[1]
    return cin % 4 == 0 and is_nm(weight, 2, 4)


def eligible(weight_shape: tuple[int, ...], m: int, groups: int = 1) -> bool:
    """A layer can take N:M masks when it is not grouped and its reduction axis divides by M."""
    return groups == 1 and len(weight_shape) in (2, 4) and weight_shape[1] % m == 0


def guarantees_2to4(n: int, m: int) -> bool:
    """Whether every N:M mask is also 2:4-compatible (true when N <= 2 and M is a multiple of 4)."""
    return m % 4 == 0 and n <= 2
