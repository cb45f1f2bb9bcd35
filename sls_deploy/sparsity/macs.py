"""Per-layer multiply-accumulate counts at a given input size, measured by forward hooks.

The model is copied to the ``meta`` device, so counting a 1280x720-output EDSR costs no arithmetic.
Bias additions are not counted (as in the SLS paper).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def layer_macs(model: nn.Module, example: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, int]:
    """{layer name: MACs for one forward pass of ``example``'s shape} for every Conv2d/Linear (or ``names``)."""
    meta = copy.deepcopy(model).to("meta")
    wanted = set(names) if names is not None else None
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in meta.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if isinstance(mod, nn.Conv2d):
            def hook(m, inp, out, name=name):
                kh, kw = m.kernel_size
                counts[name] = counts.get(name, 0) + out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            def hook(m, inp, out, name=name):
                counts[name] = counts.get(name, 0) + out.numel() * m.in_features
        else:
            continue
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            meta(example.to("meta"))
    finally:
        for h in hooks:
            h.remove()
    return counts
