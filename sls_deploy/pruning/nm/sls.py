"""SLS: layer-wise N:M sparsity search (Oh et al., CVPR 2022), written from the paper's description.

Per prunable layer, the weights of every group of M input channels are ranked by magnitude: unit i holds the
(i+1)-th largest weight of every group. Unit 0 is always kept; unit i+1 is kept while gate b_i is open.
Gates come from M-1 trainable scores k: priority p = cumprod(clamp(k, 0, c)), b = 1[p > 0.5], trained with a
straight-through estimator (b - p.detach() + p). The cumulative product makes small-magnitude units close first.
N of a layer = 1 + sum(b). The loss adds lambda * coeff * sum(layer costs), cost = (N/M) * MACs of the layer for
one 192x192 HR patch (the paper's training patch), task loss in 0-255 units as the paper's code (rgb_range 255). coeff grows by alpha when the
compression factor (dense / pruned MACs) moved less than T since the last check. When the whole model's MACs at
the reference resolution fit the budget, the gates freeze and the search ends.

Memory: units are never stored as M dense masks (the public code keeps M copies of every weight). Each layer
keeps one uint8 rank per weight; the mask is a gather from [1, b_0, ..., b_{M-2}] by rank.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from sls_deploy.config.sls import SLSSettings
from sls_deploy.pruning.nm.patterns import grouped, ungrouped, check_nm_args


def group_ranks(weight: torch.Tensor, m: int) -> torch.Tensor:
    """uint8 tensor of ``weight``'s shape: each entry's rank by |w| inside its group of M (0 = largest)."""
    check_nm_args(1, m)
    g = grouped(weight.detach().abs().float(), m)
    order = torch.argsort(g, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=g.device).expand_as(order))
    return ungrouped(ranks.to(torch.uint8), weight)


class LayerGates(nn.Module):
    """The M-1 scores of one layer and the gates they open."""

    def __init__(self, m: int, clamp: float):
        super().__init__()
        self.m, self.clamp = m, clamp
        self.scores = nn.Parameter(torch.ones(m - 1))
        self.register_buffer("frozen", torch.empty(0))  # hard gates once the search has frozen

    def priorities(self) -> torch.Tensor:
        return torch.cumprod(self.scores.clamp(0.0, self.clamp), dim=0)

    def hard(self) -> torch.Tensor:
        if self.frozen.numel():
            return self.frozen
        return (self.priorities() > 0.5).to(self.scores.dtype)

    def gates(self) -> torch.Tensor:
        """Hard gates in the forward pass, the priorities' gradient in the backward pass (STE)."""
        if self.frozen.numel():
            return self.frozen
        p = self.priorities()
        return (p > 0.5).to(p.dtype) - p.detach() + p

    def n(self) -> int:
        return 1 + int(self.hard().sum())

    def soft_n(self) -> torch.Tensor:
        return 1 + self.gates().sum()

    def freeze(self) -> None:
        self.frozen = self.hard().detach().clone()


class _UnitMask(nn.Module):
    """Parametrization: weight -> weight * mask, mask gathered from the layer's gates by per-group rank."""

    def __init__(self, gates: LayerGates, ranks: torch.Tensor):
        super().__init__()
        self._gates = [gates]  # a list, so the gates are not a submodule (they belong to the controller)
        self.register_buffer("ranks", ranks)  # in the model's state dict: a resumed run keeps the same units

    def table(self) -> torch.Tensor:
        gates = self._gates[0]
        return torch.cat([gates.scores.new_ones(1), gates.gates()])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.table()[self.ranks.long()]


class SLSSearch:
    """Training controller for the search. ``layers``: (module name, MACs at the reference resolution)."""

    def __init__(self, layers: Sequence[tuple[str, int]], fixed_macs: int, budget: float, settings: SLSSettings,
                 patch_scale: float, fractions: Mapping[str, Sequence[float]] | None = None):
        """``patch_scale`` = (training patch area) / (reference input area): converts MACs to per-patch costs.

        ``fractions`` = {layer: cost of N = 1..M as a fraction of its MACs} for the budget test (default N/M,
        the paper's MACs); what a target does with N:M (1:4 costs what 2:4 costs on TensorRT). The loss keeps
        the paper's differentiable N/M cost: it pushes N down, the budget test counts what N buys."""
        self.layers = list(layers)
        self.fractions = {n: tuple(float(f) for f in (fractions or {}).get(n, ())) or
                          tuple(k / settings.m for k in range(1, settings.m + 1)) for n, _ in self.layers}
        self.fixed_macs = fixed_macs
        self.budget = budget
        self.s = settings.validate()
        self.patch_scale = patch_scale
        self.gates = nn.ModuleDict({n.replace(".", "__"): LayerGates(self.s.m, self.s.score_clamp)
                                    for n, _ in self.layers})
        self.coeff = 1.0
        self.last_factor: float | None = None
        self.frozen_at: int | None = None
        self.closed_by_force = 0  # gates closed by force_budget() when the search ran out of steps
        self.settled = 0  # layers settle() raised to a larger N of the same cost
        self.history: list[dict] = []
        self._modules: dict[str, nn.Module] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------
    def gate(self, name: str) -> LayerGates:
        return self.gates[name.replace(".", "__")]

    @property
    def dense_macs(self) -> int:
        return self.fixed_macs + sum(c for _, c in self.layers)

    def pruned_macs(self) -> float:
        """The budget's cost: MACs, each layer at its cost fraction of its N."""
        return self.fixed_macs + sum(c * self.fractions[n][self.gate(n).n() - 1] for n, c in self.layers)

    def ratio(self) -> float:
        return self.pruned_macs() / self.dense_macs

    def n_per_layer(self) -> dict[str, int]:
        return {n: self.gate(n).n() for n, _ in self.layers}

    @property
    def finished(self) -> bool:
        return self.frozen_at is not None

    # -- controller interface -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        if self.layers:  # the gates live where the weights they mask live (before the optimizer sees them)
            self.gates.to(modules[self.layers[0][0]].weight.device)
        for name, _ in self.layers:
            mod = modules[name]
            ranks = group_ranks(mod.weight, self.s.m)
            parametrize.register_parametrization(mod, "weight", _UnitMask(self.gate(name), ranks), unsafe=True)
            self._modules[name] = mod

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.gates.parameters()), "fixed_lr": self.s.score_lr}]

    def regularizer(self) -> torch.Tensor | None:
        if self.finished:
            return None
        cost = sum(self.gate(n).soft_n() / self.s.m * (c * self.patch_scale) for n, c in self.layers)
        return self.s.lam * self.coeff * cost / self.s.loss_scale  # the task loss here is in [0, 1] units

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.finished:
            return
        ratio = self.ratio()
        if ratio <= self.budget + 1e-12:
            self.refresh()
            for name, _ in self.layers:
                self.gate(name).freeze()
            self.frozen_at = step
        elif step % self.s.check_every == 0:
            factor = 1.0 / ratio
            if self.last_factor is not None and factor - self.last_factor < self.s.threshold:
                self.coeff *= self.s.alpha
            self.last_factor = factor
        if not self.finished and step % self.s.refresh_every == 0:
            self.refresh()
        if step % self.s.check_every == 0 or self.finished:
            self.history.append({"step": step, "ratio": ratio, "coeff": self.coeff})

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-rank the units from the current magnitudes."""
        for name, mod in self._modules.items():
            p = mod.parametrizations.weight
            p[0].ranks.copy_(group_ranks(p.original, self.s.m))

    def state_dict(self) -> dict:
        return {"scores": {k: g.scores.detach().clone() for k, g in self.gates.items()},
                "frozen": {k: g.frozen.clone() for k, g in self.gates.items()},
                "coeff": self.coeff, "last_factor": self.last_factor, "frozen_at": self.frozen_at,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        with torch.no_grad():
            for k, g in self.gates.items():
                g.scores.copy_(state["scores"][k])  # in place: the optimizer holds this parameter
                g.frozen = state["frozen"][k].clone().to(g.scores.device)
        self.coeff, self.last_factor = state["coeff"], state["last_factor"]
        self.frozen_at, self.history = state["frozen_at"], list(state["history"])

    def force_budget(self) -> int:
        """If the search ran out of steps above the budget, close the open gates of lowest priority (across
        layers, always a layer's last open gate) until the budget is met; freeze. Returns gates closed."""
        closed = 0
        with torch.no_grad():
            hard = {n: self.gate(n).hard().clone() for n, _ in self.layers}
            prio = {n: self.gate(n).priorities().detach() for n, _ in self.layers}

            def ratio() -> float:
                pruned = self.fixed_macs + sum(c * self.fractions[n][int(hard[n].sum().item())]
                                               for n, c in self.layers)
                return pruned / self.dense_macs

            while ratio() > self.budget + 1e-12:
                options = [(prio[n][int(hard[n].sum()) - 1].item(), n) for n, _ in self.layers if hard[n].sum() > 0]
                if not options:
                    break
                _, name = min(options)
                hard[name][int(hard[name].sum()) - 1] = 0.0
                closed += 1
            for n, _ in self.layers:
                self.gate(n).frozen = hard[n]
        return closed

    def settle(self) -> int:
        """Raise each layer's N to the largest N of the same cost (on TensorRT 1:4 costs what 2:4 costs, 3:4 what
        dense costs: the extra weights are free accuracy); freeze. Returns the number of layers raised."""
        raised = 0
        with torch.no_grad():
            for name, _ in self.layers:
                gate = self.gate(name)
                n, frac = gate.n(), self.fractions[name]
                best = max(k for k in range(n, self.s.m + 1) if frac[k - 1] <= frac[n - 1] + 1e-12)
                hard = gate.hard().clone()
                hard[: best - 1] = 1.0
                gate.frozen = hard
                raised += best != n
        return raised

    def detach(self, model: nn.Module) -> None:
        """Bake the current hard masks into the weights (pruned entries exactly 0) and drop the parametrization."""
        with torch.no_grad():
            for name, mod in self._modules.items():
                p = mod.parametrizations.weight
                table = torch.cat([p.original.new_ones(1), self.gate(name).hard().to(p.original.dtype)])
                baked = p.original * table[p[0].ranks.long()]
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
                mod.weight.data.copy_(baked)
        self._modules.clear()
