"""Keeping pruned weights exactly zero while training.

Gradients of pruned entries are zeroed by a hook (so Adam's moments for them stay zero) and, after every
optimizer step, the weights are multiplied by their masks again, so they are exactly 0.0, not tiny.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class MaskSet:
    """{module name: boolean mask of its weight}, applied to a model by module name.

    As a training controller it keeps the masks fixed: pruned gradients zeroed, weights re-masked each step.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks = {k: v.bool() for k, v in masks.items()}
        self._handles: list = []

    def _weights(self, model: nn.Module):
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            if name not in modules or not hasattr(modules[name], "weight"):
                raise KeyError(f"mask for '{name}' matches no weight layer of the model")
            w = modules[name].weight
            if tuple(w.shape) != tuple(mask.shape):
                raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
            yield name, w, mask

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for _, w, mask in self._weights(model):
            w.mul_(mask.to(w.device, w.dtype))

    def attach(self, model: nn.Module) -> None:
        """Zero pruned entries now and register gradient hooks that keep their gradients zero. The masks move
        to the weights' device once here, not at every step."""
        self.masks = {name: mask.to(w.device) for name, w, mask in self._weights(model)}
        self.apply(model)
        for _, w, mask in self._weights(model):
            self._handles.append(w.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def detach(self, model: nn.Module | None = None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- training controller interface --
    def param_groups(self) -> list[dict]:
        return []

    def regularizer(self) -> None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply(model)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
