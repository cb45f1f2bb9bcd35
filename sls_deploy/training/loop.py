"""The training loop shared by dense training and masked finetuning.

L1 loss, Adam (betas 0.9/0.99 as BasicSR), cosine-decayed learning rate, a progress bar with loss and ETA,
a checkpoint every K steps (and on Ctrl-C), and exact resume: model, optimizer and sampler state are
restored, so a resumed run continues the same batch sequence.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sls_deploy.core import distributed as dist
from sls_deploy.core.atomic import atomic_path
from sls_deploy.core.checkpoints import load_refusal
from sls_deploy.data.patches import PatchSampler
from sls_deploy.core.errors import CheckpointError

class Controller(Protocol):
    """What a sparsity method adds to the training loop (fixed masks, SLS search, SR-STE, ...)."""

    def attach(self, model: nn.Module) -> None: ...

    def param_groups(self) -> list[dict]: ...

    def regularizer(self) -> torch.Tensor | None: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def detach(self, model: nn.Module) -> None: ...


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup: int = 0
    checkpoint_every: int = 50
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int
    final_loss: float
    seconds: float
    interrupted: bool = False


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) during training takes effect between steps, never inside one: a step interrupted inside
    the optimizer would leave some tensors updated and others not, and the resumed run would differ. The first
    Ctrl-C is recorded and honoured once the step is whole; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sampler: PatchSampler, step: int,
          run_key: str, controller: Controller | None) -> None:
    samplers = dist.gather(sampler.state())  # every rank draws its own batches; keep each rank's position
    if not dist.is_main():
        return
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "sampler": samplers[0], "samplers": samplers,
             "step": step, "run_key": run_key, "controller": controller.state_dict() if controller else {},
             "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, run_key: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"training checkpoint: {load_refusal(path, e)}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a sls-deploy training checkpoint")
    if state.get("run_key") != run_key:
        raise CheckpointError(f"{path} belongs to another run (different plan, recipe or weights)")
    return state


def train(model: nn.Module, sampler: PatchSampler, cfg: TrainConfig, *, checkpoint: Path | None = None,
          resume: bool = False, run_key: str = "", controller: Controller | None = None, desc: str = "train",
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps; return what happened.

    ``loss_fn(sr, hr)`` defaults to L1 (video finetuning passes a temporal one). The weights' learning rate
    follows the cosine schedule; a controller's own parameter groups (e.g. SLS
    scores) may set ``fixed_lr``. A controller whose ``finished`` turns true ends the run early.
    """
    torch.manual_seed(cfg.seed)
    model.train()
    if controller is not None:
        controller.attach(model)  # first: it may re-parametrize the weights
    groups = [{"params": list(model.parameters())}]
    extra = []
    if controller is not None:
        groups += controller.param_groups()
        extra = [p for g in groups[1:] for p in g["params"]]
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.99))
    start = 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = read_checkpoint(checkpoint, run_key)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        samplers = state.get("samplers") or [state["sampler"]]
        if len(samplers) != dist.world_size():
            raise CheckpointError(f"{checkpoint} was written by {len(samplers)} process(es); resume it with as many")
        sampler.set_state(samplers[dist.rank()])
        if controller is not None:
            controller.load_state_dict(state.get("controller", {}))
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
    net = model
    if dist.active():  # torchrun: average the weight gradients across ranks
        net = nn.parallel.DistributedDataParallel(model)
    t0, loss_v, done = time.perf_counter(), float("nan"), start
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or not dist.is_main(),
               dynamic_ncols=True, unit="step", mininterval=1.0)
    stop = _DeferredInterrupt()
    try:
        for step in range(start, cfg.steps):
            before = sampler.state()
            lr_img, hr_img = sampler.batch()
            if controller is not None and getattr(controller, "finished", False):
                break
            for group in opt.param_groups:
                group["lr"] = group.get("fixed_lr") or cfg.lr_at(step) * group.get("lr_scale", 1.0)
            loss = (loss_fn or F.l1_loss)(net(lr_img), hr_img)
            total = loss
            if controller is not None and (reg := controller.regularizer()) is not None:
                total = loss + reg
            opt.zero_grad(set_to_none=True)
            total.backward()
            dist.average_grads(extra)
            opt.step()
            done = step + 1  # from here on this step's update is in the weights
            if controller is not None:
                controller.after_step(model, done)
            loss_v = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{cfg.lr_at(step):.1e}", refresh=False)
            if on_step is not None:
                on_step(done, loss_v)
            if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                _save(checkpoint, model, opt, sampler, done, run_key, controller)
            if stop.requested:  # Ctrl-C arrived during this step: it is whole now, stop here
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Keep what was learned so far. A step cut off before its update is redrawn on resume.
        if checkpoint is not None and done > start:
            if done == step:
                sampler.set_state(before)
            elif controller is not None:
                controller.after_step(model, done)  # idempotent: finish the cut-off step's bookkeeping
            _save(checkpoint, model, opt, sampler, done, run_key, controller)
        raise
    finally:
        stop.restore()
        bar.close()
        if controller is not None:
            controller.detach(model)
    model.eval()
    return TrainResult(steps_done=done, resumed_from=start, final_loss=loss_v, seconds=time.perf_counter() - t0)
