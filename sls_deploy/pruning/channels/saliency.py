"""Fisher saliency of channel units: the loss increase expected from removing a unit, per MAC it saves.

A gate g_k = 1 on every unit k of a group (``ChannelScales``' per-unit scales: one gate per producer for a stream
group, summed into the unit's gradient, because removing stream unit k removes it from every producer). Removing
the unit sets g_k to 0; to second order the loss grows by 1/2 H_kk, and the empirical Fisher
F_kk = mean over samples of (dL/dg_k)^2 stands for the Hessian's diagonal (Theis et al. 2018, "Faster gaze
prediction with dense networks and Fisher pruning", arXiv:1801.05787, eq. 5-7; Molchanov et al. 2019, "Importance
estimation for neural network pruning", CVPR, for the gate gradient). The saliency is on the loss's scale, so units
of different groups compare without per-group normalisation, and dividing it by the MACs the unit saves
(``per_mac``) makes one global threshold spend the budget where a MAC costs the least loss (the cost-aware
criterion of Fisher pruning). This is the Hessian-aware global width criterion used for ``--selection fisher``;
GASSL's HAIR (regularisation-based, Hessian implicit) has no public code to follow.

Generic: any model, any groups, any batches and loss; gradients only, the weights are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from sls_deploy.core.device import model_device, to_device
from sls_deploy.core.errors import PlanError
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.scales import ChannelScales

__all__ = ["fisher_saliency", "per_mac", "unit_macs"]


def fisher_saliency(model: nn.Module, groups: Sequence, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{group: 1/2 * mean over samples of (dL/dg_k)^2 per unit} (float32, CPU) over every sample of ``batches``.

    Runs on the model's device (the batches are moved there; the sums stay there until the end). Per-sample
    gradients (one backward per sample: the Fisher is the mean of squared per-sample gradients, not
    the square of the batch gradient). The model's parameters get no update and their ``.grad`` is cleared."""
    gates = ChannelScales(model, groups)
    gates.attach(model)
    device = model_device(model)
    total = {name: torch.zeros(s.shape[-1], dtype=torch.float64, device=s.device) for name, s in gates.scales.items()}
    samples = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = to_device((x, y), device)
            for i in range(x.shape[0]):
                for s in gates.parameters():
                    s.grad = None
                out = model(x[i:i + 1])
                value = loss(out, y[i:i + 1])
                if not torch.isfinite(value):
                    raise PlanError("Fisher saliency: the loss is not finite on a calibration sample")
                grads = torch.autograd.grad(value, list(gates.parameters()), allow_unused=True)
                for (name, s), g in zip(gates.scales.items(), grads):
                    if g is None:
                        continue
                    g = g.detach().double()
                    total[name] += (g.sum(0) if g.dim() == 2 else g).pow(2)
                samples += 1
    finally:
        gates.fold()  # the gates are all 1: folding changes nothing and removes the hooks
        model.train(was_training)
    if samples == 0:
        raise PlanError("Fisher saliency: no calibration sample")
    return {name: (t / (2 * samples)).float().cpu() for name, t in total.items()}


def unit_macs(costs: GroupCosts, names: Iterable[str]) -> dict[str, int]:
    """{group: MACs saved by removing one unit from the full-width model} (whole model, exact)."""
    full = dict(costs.units)
    dense = costs.total(full)
    out = {}
    for name in names:
        if full[name] < 2:
            raise PlanError(f"channel group '{name}' has one unit: nothing to remove")
        out[name] = dense - costs.total({**full, name: full[name] - 1})
    return out


def per_mac(saliency: Mapping[str, torch.Tensor], costs: GroupCosts) -> dict[str, torch.Tensor]:
    """{group: saliency / MACs one of its units saves}: the loss a unit costs per MAC it buys."""
    macs = unit_macs(costs, saliency)
    for name, m in macs.items():
        if m <= 0:
            raise PlanError(f"channel group '{name}': removing a unit saves no MAC")
    return {name: v / float(macs[name]) for name, v in saliency.items()}
