"""Routers: per LR patch, which candidate (cheapest first) runs. One interface, three kinds.

- ``sls``: the SLS paper's rule (Oh et al., CVPR 2022, section on adaptive inference; its code was never
  released). A small CNN predicts every candidate's error on the patch; the router picks the candidate maximising
  ``beta * (C_max - C_i) / C_max + (f_0 - f_i) / f_0`` (cost saved plus error avoided relative to the cheapest
  candidate, f_0). beta sets the operating point.
- ``classsr``: a ClassSR-style classifier (XPixelGroup/ClassSR, ``codes/models/loss.py``), the candidates frozen:
  softmax over the candidates trained with cross-entropy on each train patch's label (the candidate minimising
  error + lam * cost, ``worth_its_cost``; lam gives the operating point), plus ClassSR's
  class loss (pushes each softmax towards one-hot) and its average loss (keeps the batch's class fractions at a
  target; ClassSR's target is uniform, ours the train labels' fractions). ClassPruning's two loss terms are
  unpublished; ClassSR's are the published stand-in, labelled so.
- ``edge``: no learning; the mean gradient magnitude (Sobel) of the patch's luma, cut by thresholds: flatter patches
  go to cheaper candidates. The thresholds are quantiles of train patches: as many
  patches below each as the train labels (``worth_its_cost``) send to the cheaper candidates.

Every router is fitted on one part of the train patches and calibrated (beta, class fractions, thresholds) on the
other part, to reach a target average cost; eval data never enter. Each exports as a module mapping
(N, 3, p, p) patches to (N,) int64 candidate indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.adaptive.patchset import PatchSet, luma
from sls_deploy.core.device import model_device
from sls_deploy.core.errors import UsageError

ROUTERS = ("sls", "classsr", "edge")


# --------------------------------------------------------------------------- operating point from train labels
def worth_its_cost(errors: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """Per patch, the candidate minimising error + lam * cost (MSE in 8-bit units, cost as a fraction of dense).

    An image's PSNR follows its mean squared error, the sum of its patches' errors, so the allocation that
    minimises total error at a given total cost is this Lagrangian choice for some lam; ties go to the cheaper."""
    return (errors + lam * costs.unsqueeze(0)).argmin(dim=1)


def mean_cost(choice: torch.Tensor, costs: torch.Tensor) -> float:
    return float(costs[choice].mean())


def bisect(f: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 50) -> float:
    """The smallest x in [lo, hi] (to bisection precision) with f(x) <= ``target``, f non-increasing in x."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def label_lambda(ps: PatchSet, target: float) -> float:
    """The lam whose labels (``worth_its_cost``) have mean cost ``target`` (or the nearest below) on ``ps``."""
    hi = float(ps.errors.max()) / max(float(ps.costs[-1] - ps.costs[0]), 1e-9) + 1.0
    return bisect(lambda t: mean_cost(worth_its_cost(ps.errors, ps.costs, t), ps.costs), target, 0.0, hi)


# --------------------------------------------------------------------------- the small CNN of learned routers
class PatchNet(nn.Module):
    """Three stride-2 3x3 convs (3->16->32->32), global average pool, linear to K outputs (~20k parameters)."""

    def __init__(self, k: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(width // 2, width, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(width, width, 3, 2, 1), nn.LeakyReLU(0.1))
        self.head = nn.Linear(width, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def fit_net(net: nn.Module, lr: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            steps: int, seed: int, batch: int = 64, lr_rate: float = 2e-3) -> None:
    """Adam with cosine decay; ``loss_of(outputs, batch indices)``; patches flipped/rotated at random. Runs where
    ``net`` and ``lr`` are (one device); the random draws come from a CPU generator, the same on any device."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    net.train()
    n = lr.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g).to(lr.device)
        x = lr[idx]
        k = int(torch.randint(0, 4, (1,), generator=g))
        x = torch.rot90(x, k, dims=(2, 3))
        loss = loss_of(net(x), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


# --------------------------------------------------------------------------- routers
@dataclass
class Router:
    """The interface: ``fit(fit_part, calib_part, target)``, ``choose(lr) -> (N,) indices``, ``module()``."""
    name: str = ""
    label: str = ""
    info: dict = field(default_factory=dict)

    def fit(self, fit: PatchSet, calib: PatchSet, target: float, seed: int = 0, steps: int = 600) -> None:
        raise NotImplementedError

    def module(self) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def choose(self, lr: torch.Tensor) -> torch.Tensor:
        """(N,) candidate indices on the CPU; the router runs on its own device."""
        module = self.module().eval()
        return module(lr.to(model_device(module))).long().cpu()


class _SlsRule(nn.Module):
    def __init__(self, net: nn.Module, costs: torch.Tensor, beta: float):
        super().__init__()
        self.net = net
        self.register_buffer("saved", (costs.max() - costs) / costs.max())
        self.register_buffer("beta", torch.tensor(float(beta), device=costs.device))

    def utility(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.exp(self.net(x))  # predicted MSE per candidate
        return self.beta * self.saved + (f[:, :1] - f) / f[:, :1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.utility(x).argmax(dim=1)


class SlsRouter(Router):
    def __init__(self):
        super().__init__("sls", "SLS rule: predicted error per candidate, beta * cost saved + error avoided")
        self._rule: _SlsRule | None = None

    def fit(self, fit: PatchSet, calib: PatchSet, target: float, seed: int = 0, steps: int = 600) -> None:
        torch.manual_seed(seed)  # the net's initial weights: the same seed refits the same router
        net = PatchNet(fit.costs.numel()).to(fit.lr.device)  # initialised on the CPU: the same on any device
        logs = torch.log(fit.errors + 1e-3)
        mu, sd = logs.mean(), logs.std().clamp_min(1e-6)
        fit_net(net, fit.lr, lambda out, idx: F.mse_loss(out, (logs[idx] - mu) / sd), steps, seed)
        net = _Denormalised(net, mu, sd)
        rule = _SlsRule(net, fit.costs, 0.0)
        with torch.no_grad():
            pred = rule.net(calib.lr)

        def cost_at(beta: float) -> float:
            f = torch.exp(pred)
            u = beta * rule.saved + (f[:, :1] - f) / f[:, :1]
            return mean_cost(u.argmax(dim=1), calib.costs)

        beta = bisect(cost_at, target, 0.0, 100.0)
        rule.beta.fill_(beta)
        self._rule = rule
        with torch.no_grad():
            r = torch.corrcoef(torch.stack([pred.flatten(), torch.log(calib.errors + 1e-3).flatten()]))[0, 1]
        self.info = {"beta": round(beta, 6), "calib_cost": round(cost_at(beta), 4),
                     "calib_log_error_corr": round(float(r), 4), "params": _params(net)}

    def module(self) -> nn.Module:
        if self._rule is None:
            raise UsageError("the sls router is not fitted")
        return self._rule


class _Denormalised(nn.Module):
    def __init__(self, net: nn.Module, mu, sd):
        super().__init__()
        self.net = net
        self.register_buffer("mu", torch.as_tensor(mu).float().reshape(()))
        self.register_buffer("sd", torch.as_tensor(sd).float().reshape(()))

    def forward(self, x):
        return self.net(x) * self.sd + self.mu


def class_loss(p: torch.Tensor) -> torch.Tensor:
    """ClassSR's class loss for K classes: (K - 1) - sum over class pairs |p_i - p_j|, batch mean (0 when
    one-hot)."""
    k = p.shape[1]
    diffs = (p.unsqueeze(2) - p.unsqueeze(1)).abs().sum(dim=(1, 2)) / 2
    return (k - 1 - diffs).mean()


def average_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ClassSR's average loss with target class fractions: sum_k |sum_i p_ik - n * t_k| / (4 n / K)."""
    n, k = p.shape
    return (p.sum(dim=0) - n * target).abs().sum() / (4 * n / k)


class _Argmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).argmax(dim=1)


class ClassSrRouter(Router):
    def __init__(self, w_class: float = 0.1, w_average: float = 0.1):
        super().__init__("classsr", "ClassSR-style classifier (class + average losses; ClassPruning's terms "
                                    "unpublished)")
        self.w_class, self.w_average = w_class, w_average
        self._net: nn.Module | None = None

    def fit(self, fit: PatchSet, calib: PatchSet, target: float, seed: int = 0, steps: int = 600) -> None:
        k = fit.costs.numel()
        lam = label_lambda(fit, target)
        labels = worth_its_cost(fit.errors, fit.costs, lam)
        fractions = torch.bincount(labels, minlength=k).float() / labels.numel()
        torch.manual_seed(seed)  # the net's initial weights: the same seed refits the same router
        net = PatchNet(k).to(fit.lr.device)

        def loss_of(out, idx):
            p = out.softmax(dim=1)
            return F.cross_entropy(out, labels[idx]) + self.w_class * class_loss(p) + \
                self.w_average * average_loss(p, fractions)

        fit_net(net, fit.lr, loss_of, steps, seed)
        self._net = _Argmax(net)
        with torch.no_grad():
            c = mean_cost(self._net(calib.lr), calib.costs)
        self.info = {"label_lambda": round(lam, 6), "target_fractions": [round(float(f), 4) for f in fractions],
                     "calib_cost": round(c, 4), "w_class": self.w_class, "w_average": self.w_average,
                     "params": _params(net)}

    def module(self) -> nn.Module:
        if self._net is None:
            raise UsageError("the classsr router is not fitted")
        return self._net


class EdgeEnergy(nn.Module):
    """Mean Sobel gradient magnitude of the patch's luma, cut by ascending thresholds -> candidate index."""

    def __init__(self, thresholds: torch.Tensor):
        super().__init__()
        sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([sx, sx.t()]).unsqueeze(1))
        self.register_buffer("thresholds", thresholds.float())

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(luma(x), self.kernel)
        return g.abs().sum(dim=1).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.energy(x).unsqueeze(1) > self.thresholds.unsqueeze(0)).sum(dim=1)


class EdgeRouter(Router):
    def __init__(self):
        super().__init__("edge", "edge energy (mean Sobel magnitude) with thresholds from train quantiles")
        self._mod: EdgeEnergy | None = None

    def fit(self, fit: PatchSet, calib: PatchSet, target: float, seed: int = 0, steps: int = 0) -> None:
        k = fit.costs.numel()
        both = PatchSet(torch.cat([fit.lr, calib.lr]), torch.cat([fit.errors, calib.errors]), fit.costs)
        lam = label_lambda(both, target)
        labels = worth_its_cost(both.errors, both.costs, lam)
        cum = torch.cumsum(torch.bincount(labels, minlength=k).float(), 0) / labels.numel()
        energy = EdgeEnergy(torch.zeros(k - 1)).to(both.lr.device).energy(both.lr)
        thresholds = torch.quantile(energy, cum[:-1].clamp(0, 1))
        # candidates no train patch went to (from the first whose cumulative share is 1) are never chosen
        thresholds[cum[:-1] >= 1 - 1e-9] = float("inf")
        self._mod = EdgeEnergy(thresholds).to(thresholds.device)
        self.info = {"label_lambda": round(lam, 6),
                     "thresholds": [round(float(t), 4) for t in thresholds],
                     "train_cost": round(mean_cost(self._mod(both.lr), both.costs), 4)}

    def module(self) -> nn.Module:
        if self._mod is None:
            raise UsageError("the edge router is not fitted")
        return self._mod


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_router(name: str) -> Router:
    cls = {"sls": SlsRouter, "classsr": ClassSrRouter, "edge": EdgeRouter}.get(name)
    if cls is not None:
        return cls()
    raise UsageError(f"unknown router '{name}' (choose from {', '.join(ROUTERS)})")
