"""Distillation from the dense model during finetuning: the pruned model's outputs, stream features or recurrent
hidden states pulled toward the dense model's on the same input.

One controller (``DenseDistill``, a ``training.loop.Controller``) holds one or more terms, each a set of module names
and a weight; hooks record the student's module outputs during its forward pass, ``regularizer`` runs the teacher
once on the same input (no gradients) and returns

    sum over terms  weight * mean over recorded calls of mean |out(pruned) - out(dense)|

Module name ``""`` is the whole model: its output. The terms ``finetune`` builds:

- **output distillation** (``--distill-weight``, images and video): ``("",)``, the SR output. Knowledge
  distillation from the unpruned network is what structured-pruning papers for SR recover with (ASSL/SRP finetune
  with L1 only; distilling the dense model's output is the common KD baseline).
- **feature distillation** (``--feature-distill-weight``): the adapter's ``feature_modules`` (EDSR: every residual
  block's output, the residual stream), comparable element by element only while the stream keeps its dense width
  (``keep_full: [stream]``); a narrower stream is refused in one line at the first step.
- **temporal finetuning** (``--tf-weight``, video): the adapter's ``state_modules``, the recurrent hidden state of
  each time step. SSL (Xia et al., CVPR 2023) names Temporal Finetuning as the remedy for pruning error amplified
  along the recurrence; its public code (Zj-BinXia/SSL) has no TF term and the paper's exact loss could not be read
  here, so this is distillation over the recurrence, as above.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.core.controller import StatelessController

from sls_deploy.core.errors import UsageError


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over recorded calls of mean |h_s - h_t| (the teacher's outputs carry no gradient)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student hidden states for {len(teacher)} teacher ones")
    return torch.stack([F.l1_loss(s, t.detach()) for s, t in zip(student, teacher)]).mean()


class DistillTerm:
    """One term: these modules' outputs, this weight, a name for logs and errors."""

    def __init__(self, name: str, modules: Sequence[str], weight: float, hint: str = ""):
        if not weight > 0:
            raise UsageError(f"{name} weight must be > 0, not {weight}")
        self.name, self.modules, self.weight, self.hint = name, tuple(modules), float(weight), hint


def output_term(weight: float) -> DistillTerm:
    return DistillTerm("output distillation", ("",), weight)


def feature_term(modules: Sequence[str], weight: float) -> DistillTerm:
    if not modules:
        raise UsageError("feature distillation: the model's adapter names no feature modules (use --distill-weight, "
                         "output distillation)")
    return DistillTerm("feature distillation", modules, weight,
                       "feature distillation compares the residual stream, which must keep its dense width "
                       "(--keep-full stream); use --distill-weight (the output) instead")


def temporal_term(modules: Sequence[str], weight: float) -> DistillTerm:
    if not modules:
        raise UsageError("temporal finetuning needs a recurrent model (the adapter names no state modules)")
    return DistillTerm("temporal finetuning", modules, weight)


class DenseDistill(StatelessController):
    """The distillation terms as one training controller (see the module docstring): one teacher run per step."""

    def __init__(self, teacher: nn.Module, terms: Sequence[DistillTerm]):
        if not terms:
            raise ValueError("no distillation term")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.terms = list(terms)
        self.names = tuple(dict.fromkeys(m for t in self.terms for m in t.modules))
        self._states: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self._inputs: tuple | None = None
        self._handles: list = []
        self.last: dict[str, float] = {}

    @staticmethod
    def _record_into(dest: list):
        def hook(module, inputs, output):
            dest.append(output)
        return hook

    def attach(self, model: nn.Module) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in self.names if n not in mods]
        if missing:
            term = next(t for t in self.terms if missing[0] in t.modules)
            raise UsageError(f"{term.name}: the model has no module '{missing[0]}'")

        def keep_inputs(module, args):
            self._inputs = tuple(a.detach() for a in args)
            for v in self._states.values():
                v.clear()

        self._handles.append(model.register_forward_pre_hook(keep_inputs))
        self._handles += [mods[n].register_forward_hook(self._record_into(self._states[n])) for n in self.names]

    def teacher_states(self, inputs: tuple) -> dict[str, list[torch.Tensor]]:
        states: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        mods = dict(self.teacher.named_modules())
        handles = [mods[n].register_forward_hook(self._record_into(states[n])) for n in self.names]
        try:
            with torch.no_grad():
                self.teacher(*inputs)
        finally:
            for h in handles:
                h.remove()
        return states

    def term_loss(self, term: DistillTerm, student: dict, teacher: dict) -> torch.Tensor:
        s = [x for n in term.modules for x in student[n]]
        t = [x for n in term.modules for x in teacher[n]]
        for n in term.modules:
            for a, b in zip(student[n], teacher[n]):
                if a.shape != b.shape:
                    where = "the output" if n == "" else f"'{n}'"
                    raise UsageError(f"{term.name}: {where} is {tuple(a.shape)} in the pruned model and "
                                     f"{tuple(b.shape)} in the dense one" + (f"; {term.hint}" if term.hint else ""))
        return term.weight * hidden_state_loss(s, t)

    def regularizer(self) -> torch.Tensor | None:
        if self._inputs is None or not any(self._states.values()):
            return None
        teacher = self.teacher_states(self._inputs)
        parts = {t.name: self.term_loss(t, self._states, teacher) for t in self.terms}
        for v in self._states.values():
            v.clear()  # in place: the hooks hold these lists
        self._inputs = None
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return sum(parts.values())

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for v in self._states.values():
            v.clear()
        self._inputs = None


def temporal_finetuning(teacher: nn.Module, state_modules: Sequence[str], weight: float) -> DenseDistill:
    """Temporal finetuning alone."""
    return DenseDistill(teacher, [temporal_term(state_modules, weight)])


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
