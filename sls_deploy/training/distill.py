"""Temporal finetuning: the pruned model's hidden states pulled toward the dense model's at every time step.

SSL (Xia et al., CVPR 2023) observes that pruning error is amplified as hidden states propagate along the
recurrence and names Temporal Finetuning (TF) as the remedy; its public code (Zj-BinXia/SSL) has no TF term and
the paper's exact loss could not be read here. What is implemented: distillation over the recurrence,

    L_TF = weight * mean_t mean |h_t(pruned) - h_t(dense)|

where h_t is the output of every module the adapter names in ``state_modules`` (BasicVSR: each trunk, once per
frame and direction; StreamVSR: the forward trunk), the dense model runs on the same clip without gradients, and
the stream/hidden state keeps the dense width (the channel plans never prune it), so the two compare element by
element. It is a training controller (``training.loop.Controller``): hooks record the student's states during
its forward pass, ``regularizer`` runs the teacher on the same input and returns the term.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.core.controller import StatelessController

from sls_deploy.core.errors import UsageError


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over time steps of mean |h_s - h_t| (the teacher's states carry no gradient)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student hidden states for {len(teacher)} teacher ones")
    return torch.stack([F.l1_loss(s, t.detach()) for s, t in zip(student, teacher)]).mean()


class HiddenStateDistill(StatelessController):
    """The TF term as a training controller (see the module docstring)."""

    def __init__(self, teacher: nn.Module, state_modules: Sequence[str], weight: float):
        if not state_modules:
            raise UsageError("temporal finetuning needs a recurrent model (the adapter names no state modules)")
        if not weight > 0:
            raise UsageError(f"temporal finetuning weight must be > 0, not {weight}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.names, self.weight = tuple(state_modules), float(weight)
        self._states: list[torch.Tensor] = []
        self._inputs: tuple | None = None
        self._handles: list = []
        self.last: float | None = None

    def _record_into(self, dest: list):
        def hook(module, inputs, output):
            dest.append(output)
        return hook

    def attach(self, model: nn.Module) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in self.names if n not in mods]
        if missing:
            raise UsageError(f"temporal finetuning: the model has no module '{missing[0]}'")

        def keep_inputs(module, args):
            self._inputs = tuple(a.detach() for a in args)
            self._states.clear()

        self._handles.append(model.register_forward_pre_hook(keep_inputs))
        self._handles += [mods[n].register_forward_hook(self._record_into(self._states)) for n in self.names]

    def teacher_states(self, inputs: tuple) -> list[torch.Tensor]:
        states: list[torch.Tensor] = []
        mods = dict(self.teacher.named_modules())
        handles = [mods[n].register_forward_hook(self._record_into(states)) for n in self.names]
        try:
            with torch.no_grad():
                self.teacher(*inputs)
        finally:
            for h in handles:
                h.remove()
        return states

    def regularizer(self) -> torch.Tensor | None:
        if self._inputs is None or not self._states:
            return None
        loss = self.weight * hidden_state_loss(self._states, self.teacher_states(self._inputs))
        self._states.clear()  # in place: the hooks hold this list
        self._inputs = None
        self.last = float(loss.detach())
        return loss

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._states.clear()
        self._inputs = None


class Controllers:
    """Several controllers as one (fixed masks + temporal finetuning): each gets every call, in order; the
    regularizers add up; the state is one entry per controller."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if p is not None]

    @property
    def finished(self) -> bool:
        return any(getattr(p, "finished", False) for p in self.parts)

    def attach(self, model: nn.Module) -> None:
        for p in self.parts:
            p.attach(model)

    def param_groups(self) -> list[dict]:
        return [g for p in self.parts for g in p.param_groups()]

    def regularizer(self) -> torch.Tensor | None:
        terms = [r for p in self.parts if (r := p.regularizer()) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_step(self, model: nn.Module, step: int) -> None:
        for p in self.parts:
            p.after_step(model, step)

    def state_dict(self) -> dict:
        return {str(i): p.state_dict() for i, p in enumerate(self.parts)}

    def load_state_dict(self, state: dict) -> None:
        for i, p in enumerate(self.parts):
            p.load_state_dict(state.get(str(i), {}))

    def detach(self, model: nn.Module) -> None:
        for p in reversed(self.parts):
            p.detach(model)
