"""Unit importance: one interface for every criterion (Torch-Pruning's ``Importance.__call__(group) -> scores``).

An ``Importance`` scores the units of one channel group (float32, shape [units], higher = keep). Criteria that
need data (gradients, saliency) ``prepare`` once over a model's groups before they are called; ``normalize``
says whether one global threshold across groups must first normalise each group's scores (per-group scales
differ) or may compare them raw (scores already on one scale, e.g. the loss's). ``scores(model, groups)`` gives
{group: scores} for a list of groups.

- ``L1Importance``: the filter L1 norm (mean |w| per unit), the classic magnitude criterion;
- ``FisherPerMac``: empirical Fisher saliency of a per-unit gate per MAC the unit costs (``channels.saliency``);
- ``LearnedScales``: |learned scale| per unit after SSL's growing penalty (``channels.scales``), folded in.
"""

from __future__ import annotations

import torch
from torch import nn

from sls_deploy.core.device import model_device, to_device
from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.channels.groups import conv_of, producers_of, unit_count, unit_size
from sls_deploy.pruning.channels.saliency import fisher_saliency, per_mac


def l1_importance(model: nn.Module, group, normalize: bool = True) -> torch.Tensor:
    """Per-unit L1 norm of the producer's filters (float32, shape [units]).

    A unit's value is the sum of |w| over its ``unit`` weight rows (bias excluded). With ``normalize`` (the
    default) it is divided by the number of weights summed, unit * fan-in (in_channels/groups * kh * kw):
    the mean |w| of the unit, so units of layers with different fan-in or unit size compare on one scale.
    A stream group's unit gets the mean of that value over its producers (normalised), or the sum (not).
    """
    units = unit_count(model, group)
    total = None
    prods = producers_of(group)
    if not prods:  # a gather group: the consumers' weight columns (mean |w| per input channel)
        for name in group.consumers:
            w = conv_of(model, name, group, "consumer").weight.detach().float()
            per_unit = w.abs().transpose(0, 1).reshape(units, -1).sum(1)
            if normalize:
                per_unit = per_unit / (w.shape[0] * w[0, 0].numel())
            total = per_unit if total is None else total + per_unit
        return total / len(group.consumers) if normalize else total
    for name in prods:
        w = conv_of(model, name, group, "producer").weight.detach().float()
        per_unit = w.abs().reshape(units, -1).sum(1)  # rows are contiguous: unit k = rows k*unit .. k*unit+unit-1
        if normalize:
            per_unit = per_unit / (unit_size(group) * w[0].numel())
        total = per_unit if total is None else total + per_unit
    return total / len(prods) if normalize else total


class Importance:
    """Scores the units of a channel group: ``__call__(model, group) -> tensor [units]`` (higher = keep).

    ``prepare(model, groups, costs)`` runs once before the calls (criteria that need data measure it there).
    ``normalize``: whether a global threshold across groups must normalise each group's scores first.
    ``info``: what the search records about the criterion (``plan.search``) when it chooses the kept units."""

    name = ""
    label = ""  # a short name for records (a nested family's done.json)
    normalize = True
    info: dict[str, str] = {}

    def prepare(self, model: nn.Module, groups, costs) -> None:
        pass

    def __call__(self, model: nn.Module, group) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, model: nn.Module, groups, costs, skip=()) -> dict[str, torch.Tensor]:
        """{group: scores} for every group not in ``skip``, after ``prepare``."""
        self.prepare(model, groups, costs)
        return {g.name: self(model, g) for g in groups if g.name not in skip}


class L1Importance(Importance):
    """The filter L1 norm (mean |w| per unit), compared across groups after per-group normalisation."""

    name = "l1"
    label = "filter L1 norm"
    info = {"importance": "l1 filter norm (mean |w| per unit)"}

    def __call__(self, model: nn.Module, group) -> torch.Tensor:
        return l1_importance(model, group)


class _PerMac(Importance):
    """A criterion on the loss's scale divided by the MACs one unit of its group saves: one raw threshold across
    groups spends the budget where a MAC costs the least loss."""

    normalize = False
    batches = 16  # training batches the criterion is measured on (drawn with their own seed)

    def __init__(self, sampler, loss):
        self.sampler, self.loss = sampler, loss  # () -> batch source; the training loss
        self.costs, self.raw = None, {}

    def prepare(self, model: nn.Module, groups, costs) -> None:
        data = self.sampler()
        self.costs = costs
        self.raw = self.measure(model, groups, (data.batch() for _ in range(self.batches)))

    def measure(self, model: nn.Module, groups, batches) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, group) -> torch.Tensor:
        return per_mac({group.name: self.raw[group.name]}, self.costs)[group.name]


class FisherPerMac(_PerMac):
    """Empirical Fisher saliency of a per-unit gate per MAC saved (``channels.saliency``)."""

    name = "fisher"
    label = "Fisher saliency per MAC"
    info = {"importance": "Fisher saliency per MAC saved (empirical Fisher of a per-unit gate)",
            "marks": "units below the budget's global Fisher-per-MAC threshold",
            "selection": "one global threshold on Fisher saliency per MAC saved; the marked units are "
                         "driven to 0 by the growing penalty, then sliced away"}

    def measure(self, model: nn.Module, groups, batches) -> dict[str, torch.Tensor]:
        return fisher_saliency(model, groups, batches, self.loss)


class LearnedScales(Importance):
    """|learned scale| per unit after SSL's growing penalty, folded into the weights (``channels.scales``):
    given the folded scales, not measured here."""

    name = "scales"
    label = "|learned scale|"
    info = {"importance": "|learned scale| per unit after the growing penalty",
            "selection": "one global threshold on per-group normalised |scale|"}

    def __init__(self, folded: dict[str, torch.Tensor], normalize: bool = True):
        self.folded, self.normalize = folded, normalize

    def __call__(self, model: nn.Module, group) -> torch.Tensor:
        return self.folded[group.name]


class TaylorPerMac(_PerMac):
    """Group Taylor importance (first order, Torch-Pruning's ``GroupTaylorImportance``; Molchanov et al. 2019,
    "Importance estimation for neural network pruning", CVPR): the loss change of removing unit k estimated as
    |w * dL/dw| summed over every weight of the unit in its group (the producers' rows and biases, the consumers'
    input columns), with the gradient of the mean loss over the batches; per MAC saved."""

    name = "taylor"
    label = "group Taylor per MAC"
    info = {"importance": "group Taylor |w * dL/dw| per MAC saved (first order, summed over the unit's weights)",
            "marks": "units below the budget's global Taylor-per-MAC threshold",
            "selection": "one global threshold on group Taylor importance per MAC saved; the marked units are "
                         "driven to 0 by the growing penalty, then sliced away"}

    def measure(self, model: nn.Module, groups, batches) -> dict[str, torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        device, was_training = model_device(model), model.training
        model.eval()
        try:
            for p in params:
                p.grad = None
            loss, n = 0.0, 0
            for x, y in batches:
                x, y = to_device((x, y), device)
                loss = loss + self.loss(model(x), y)
                n += 1
            if n == 0:
                raise PlanError("Taylor importance: no calibration batch")
            if not torch.isfinite(loss):
                raise PlanError("Taylor importance: the loss is not finite on the calibration batches")
            (loss / n).backward()
            return {g.name: self._group(model, g).float().cpu() for g in groups}
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            model.train(was_training)

    @staticmethod
    def _group(model: nn.Module, group) -> torch.Tensor:
        units, unit = unit_count(model, group), unit_size(group)

        def wg(t: torch.Tensor) -> torch.Tensor:
            return (t.detach() * t.grad).abs() if t.grad is not None else torch.zeros_like(t)

        total = torch.zeros(units, dtype=torch.float64, device=next(model.parameters()).device)
        for name in producers_of(group):
            conv = conv_of(model, name, group, "producer")
            total += wg(conv.weight).double().reshape(units, -1).sum(1)  # unit k = rows k*unit .. k*unit+unit-1
            if conv.bias is not None:
                total += wg(conv.bias).double().reshape(units, unit).sum(1)
        for name in group.consumers:
            w = conv_of(model, name, group, "consumer").weight
            total += wg(w).double().transpose(0, 1).reshape(units, -1).sum(1)
        return total


# the criteria a unit ranking may use before any training, by --selection name (others: the L1 norm)
RANKINGS: dict[str, type[_PerMac]] = {"fisher": FisherPerMac, "taylor": TaylorPerMac}


def ranking_for(selection: str, sampler, loss) -> Importance:
    """The criterion that ranks units before any training for ``--selection``: a data criterion of
    ``RANKINGS`` (measured on ``sampler()``'s batches with ``loss``), else the filter L1 norm."""
    cls = RANKINGS.get(selection)
    return cls(sampler, loss) if cls is not None else L1Importance()
