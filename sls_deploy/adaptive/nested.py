"""Nested channel families: members whose kept units are nested and whose weights are one shared set.

``sls-deploy build --budget A --budget B ... --nested`` (channel methods): one ranking of every group's units on
the base model (filter L1 norm, or Fisher saliency per MAC with ``--selection fisher``; ``pruning.channels.search
.unit_ranking``) gives each member its widths under its budget (``l1``: the uniform selection, else the global
one), the widths capped so that a smaller member is never wider than a larger one in any group, and its kept units
the top of that one ranking: each member's units are a subset of the next larger member's. The full-width network
is then trained under all members' masks at once (``UnitMasks``; loss = mean over members of the training loss;
``--steps`` steps of one forward pass per member: each member sees as many batches as its own finetune would,
through masked full-width passes that cost the dense model's MACs), as ClassPruning trains
nested sub-networks that share their weights. Each member bundle is that one weight set sliced to its units, with
no training of its own (``steps`` 0), then exported and validated like any bundle; its report's dense model is
the base the family was pruned from (the shared full-width network is never run unmasked). ssl's learned-scale
phase has no place here (it would give each member its own units); the joint training replaces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sls_deploy.backends.loading import load_model, resolve_base_weights
from sls_deploy.core import atomic
from sls_deploy.core.checkpoints import save_weights
from sls_deploy.core.errors import PlanError, SlsError, UsageError
from sls_deploy.core.safe_json import load_json
from sls_deploy.modalities import registry as modalities
from sls_deploy.pruning.channels.masks import UnitMasks, is_nested
from sls_deploy.pruning.channels.costs import GroupCosts
from sls_deploy.pruning.channels.groups import widths_of
from sls_deploy.pruning.channels.selection import select_global, select_uniform, top_units
from sls_deploy.pruning.channels.search import unit_ranking, units_record
from sls_deploy.pruning.registry import strategy_for
from sls_deploy.training.loop import TrainConfig, train

SHARED = "shared.safetensors"  # the one weight set (full width) every member is sliced from
NESTED_DIR = "nested"  # nested/<member>.json: a member's kept units; nested/joint.ckpt; nested/done.json


def nested_keeps(rank, costs: GroupCosts, budgets, round_to: int, *, uniform: bool = False,
                 normalize: bool = True) -> dict[float, dict[str, torch.Tensor]]:
    """{budget: {group: kept units}}, nested: widths selected per budget, capped from the largest budget down
    (a smaller member is never wider), units the top of one ranking per group. Capping only lowers a member's
    MACs, so every member stays within its budget."""
    budgets = sorted(budgets)
    widths = {}
    for b in budgets:
        keep = select_uniform(rank, costs, b, round_to, fill=True) if uniform else \
            select_global(rank, costs, b, round_to, normalize)
        widths[b] = widths_of(keep)
    for lo, hi in zip(reversed(budgets[:-1]), reversed(budgets[1:])):
        widths[lo] = {g: min(w, widths[hi][g]) for g, w in widths[lo].items()}
    keeps = {b: {g: top_units(rank[g], w) for g, w in widths[b].items()} for b in budgets}
    for lo, hi in zip(budgets[:-1], budgets[1:]):
        if not is_nested(keeps[lo], keeps[hi]):  # not reached: one ranking and capped widths nest
            raise PlanError(f"member {lo:g} is not nested in member {hi:g}")
    return keeps


class _Members(nn.Module):
    """The full-width model run once per member mask; the outputs concatenated along the batch."""

    def __init__(self, model: nn.Module, masks: UnitMasks):
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, x):
        outs = []
        try:
            for name in self.masks.masks:
                self.masks.use(name)
                outs.append(self.model(x))
        finally:
            self.masks.use(None)
        return torch.cat(outs, dim=0)


def train_shared(model: nn.Module, groups, members: dict[str, dict[str, torch.Tensor]], sampler, cfg: TrainConfig,
                 *, checkpoint: Path | None = None, run_key: str = "", progress: bool = True, loss=None):
    """Train ``model`` in place under every member's unit masks at once: loss = mean over members of
    ``loss`` (L1 by default) on the same batch. Returns the training result."""
    masks = UnitMasks(model, groups, members)
    masks.attach(model)
    base = loss or F.l1_loss
    k = len(members)

    def joint(sr, hr):
        return base(sr, hr.repeat(k, *([1] * (hr.dim() - 1))))

    try:
        return train(_Members(model, masks), sampler, cfg, checkpoint=checkpoint, resume=True, run_key=run_key,
                     desc="nested members", progress=progress, loss_fn=joint)
    finally:
        masks.detach()


def prepare_nested(recipe, settings: dict, out: Path, member_dir, log, progress: bool = True,
                   compute=None) -> tuple[dict, dict]:
    """Plan the nested members, train the shared weights (skipped when ``nested/done.json`` matches), write the
    members' unit files; return ({budget: the member's settings: given units, shared weights, 0 steps},
    the family file's "nested" record). ``compute``: where the shared weights train (None: the CPU)."""
    from sls_deploy.core.device import Compute

    compute = compute or Compute()
    budgets = sorted(settings)
    s0 = settings[budgets[0]]
    strategy = strategy_for(s0.method)
    if strategy.family != "channels" or strategy.has_nm_part:
        raise UsageError(f"--nested builds channel members (--method ssl, l1 or l1-global), not --method {s0.method}")
    if s0.steps < 1:
        raise UsageError("--nested trains the shared weights: give --steps >= 1")
    base = resolve_base_weights(recipe, s0.weights)
    model = load_model(recipe, base, device=compute.device)
    adapter = recipe.adapter
    groups = adapter.channel_groups(model)
    h, w = recipe.reference_input_hw()
    costs = GroupCosts.measure(adapter.export_module(model), groups, adapter.example_input(recipe.model, h, w))
    full = set(s0.kept_full([g.name for g in groups]))
    rank, criterion = unit_ranking(s0, model, groups, costs, full,
                                   lambda seed: modalities.sampler(recipe, s0.modality, s0.data, seed),
                                   modalities.loss_fn(s0.modality, s0.temporal_weight))
    normalize = criterion.normalize
    keeps = nested_keeps(rank, costs, budgets, s0.round_to, uniform=strategy.uniform_widths, normalize=normalize)
    members = {member_dir(b): keeps[b] for b in budgets}
    units = {name: {g: [int(i) for i in k.tolist()] for g, k in keep.items()} for name, keep in members.items()}
    folder = out / NESTED_DIR
    key = {"recipe": recipe.digest(), "base": atomic.sha256_file(base), "units": units, "steps": s0.steps,
           "seed": s0.seed, "data": s0.data, "ft": recipe.finetune.__dict__, "modality": s0.modality}
    done = folder / "done.json"
    shared = out / SHARED
    record = {"shared_weights": SHARED, "steps": s0.steps, "members": list(members),
              "ranking": criterion.label,
              "selection": "uniform" if strategy.uniform_widths else "global threshold"}
    previous = _read_json(done)
    if not (previous and previous.get("key") == key and shared.is_file()
            and previous.get("sha256") == atomic.sha256_file(shared)):
        folder.mkdir(parents=True, exist_ok=True)
        log(f"nested family: {len(members)} members trained jointly for {s0.steps} steps "
            f"({len(members)} forward passes a step)")
        sec = recipe.finetune
        cfg = TrainConfig(steps=s0.steps, lr=sec.lr, warmup=sec.warmup, checkpoint_every=sec.checkpoint_every,
                          seed=s0.seed, amp=compute.amp, channels_last=compute.channels_last)
        result = train_shared(model, groups, members, modalities.sampler(recipe, s0.modality, s0.data, s0.seed + 1),
                              cfg, checkpoint=folder / "joint.ckpt", run_key=_digest(key),
                              progress=progress, loss=modalities.loss_fn(s0.modality, s0.temporal_weight))
        save_weights(model, shared, {"nested": ",".join(members), "steps": str(result.steps_done)})
        atomic.write_json(done, {"key": key, "sha256": atomic.sha256_file(shared),
                                 "seconds": round(result.seconds, 1), "final_loss": result.final_loss})
        ckpt = folder / "joint.ckpt"
        if ckpt.exists():
            ckpt.unlink()
    for name, u in units.items():  # always (re)written: cheap, and the members read them next
        atomic.write_json(folder / f"{name}.json", units_record(shared, u))
    out_settings = {b: dataclasses.replace(settings[b], units=str((folder / f"{member_dir(b)}.json").resolve()),
                                           steps=0).check(recipe) for b in budgets}
    return out_settings, record


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path):
    try:
        return load_json(path, "nested family record")
    except SlsError:
        return None
