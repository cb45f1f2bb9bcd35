"""Per-layer multiply-accumulate counts at a given input size, measured by forward hooks.

The model is copied to the ``meta`` device, so counting a 1280x720-output EDSR costs no arithmetic. A model
whose forward needs an op without a meta kernel is counted by a real forward of a CPU copy instead.
Bias additions are not counted (as in the SLS paper).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def layer_macs(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...],
               names: Iterable[str] | None = None) -> dict[str, int]:
    """{layer name: MACs for one forward pass of ``example``'s shape} for every Conv2d/Linear (or ``names``).

    ``example`` is the forward's one tensor, or a tuple of its tensors (``model(*example)``).
    """
    args = example if isinstance(example, tuple) else (example,)
    wanted = set(names) if names is not None else None
    try:
        return _count(copy.deepcopy(model).to("meta"), tuple(a.to("meta") for a in args), wanted)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        return _count(copy.deepcopy(model).to("cpu"), tuple(a.to("cpu") for a in args), wanted)


def _count(model: nn.Module, args: tuple[torch.Tensor, ...], wanted: set[str] | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
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
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return counts
