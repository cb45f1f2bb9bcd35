"""SR-STE (Zhou et al., ICLR 2021): uniform N:M trained with the sparse-refined straight-through estimator.

The forward pass uses W * m, m = top-N |W| per group recomputed every step from the dense weights; the
gradient reaches all of W unchanged (straight-through), plus the sparse-refined term lambda_w * (1 - m) * W
that decays the currently pruned weights. At the end the masks are baked in (pruned entries exactly 0).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sls_deploy.core.controller import StatelessController
from torch.nn.utils import parametrize

from sls_deploy.pruning.nm.patterns import nm_mask


class _STEMask(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.n, self.m = n, m

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * nm_mask(weight, self.n, self.m).to(weight.dtype)
        return weight + (masked - weight).detach()


class SRSTE(StatelessController):
    """Training controller. ``layers``: (module name, N); M shared."""

    finished = False

    def __init__(self, layers: Sequence[tuple[str, int]], m: int, decay: float = 2e-4):
        self.layers, self.m, self.decay = list(layers), m, decay
        self._modules: dict[str, nn.Module] = {}

    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, n in self.layers:
            parametrize.register_parametrization(modules[name], "weight", _STEMask(n, self.m), unsafe=True)
            self._modules[name] = modules[name]

    def regularizer(self) -> torch.Tensor | None:
        terms = []
        for name, n in self.layers:
            w = self._modules[name].parametrizations.weight.original
            pruned = ~nm_mask(w, n, self.m)
            terms.append((w * pruned).pow(2).sum())
        return 0.5 * self.decay * torch.stack(terms).sum() if terms else None

    def detach(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, n in self.layers:
                mod = self._modules[name]
                w = mod.parametrizations.weight.original
                baked = w * nm_mask(w, n, self.m).to(w.dtype)
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
                mod.weight.data.copy_(baked)
        self._modules.clear()
