#!/usr/bin/env python3
"""EDSR at equal MACs and equal steps: our default channel selection against the tools a user would pick instead,
Torch-Pruning (DepGraph) and NVIDIA ModelOpt FastNAS (issue 26).

Every peer only *selects* the kept channels; its selection becomes kept units per adapter channel group (the
``units`` kept-units file that nested family members use) and this project's own build finetunes, exports and
validates it with the recipe's finetune settings, so only the selection differs. Rows per (budget, seed):

- ``ours``: the recipe's default (ssl, residual stream kept full, round_to 16); its reached MACs ratio is the
  target every peer of that budget and seed is bisected to (within ``--tol``, default 0.5%, by our counter).
- ``ours-distill-output`` / ``ours-distill-features``: ours' own search (the ``ours`` row's bundle after its search
  stage, copied), finetuned with the dense model as teacher: ``--distill-weight`` (``--kd-weight``, output L1), and
  for ``-features`` also ``--feature-distill-weight`` (``--fkd-weight``, every residual block's output). Same steps.
- ``tp-l1-*`` / ``tp-taylor-*``: Torch-Pruning ``MetaPruner``, global pruning, ``GroupMagnitudeImportance(p=1)``
  or ``GroupTaylorImportance`` (gradients accumulated over 16 training batches), ``round_to`` 8.
- ``tp-groupnorm-*``: Torch-Pruning ``GroupNormPruner`` (group L2 importance, its regulariser applied after every
  backward) sparse-trained for the same share of the steps as our ssl penalty phase (recipe ssl_steps/steps),
  then pruned (global, round_to 8) and finetuned for the rest.
- ``*-stream-ignored``: the residual-stream producers are in ``ignored_layers`` (the stream stays 64 wide, like
  ours); ``*-stream-pruned``: the stream is one more group.
- ``modelopt-fastnas``: ``mtp.prune(mode=[("fastnas", channel_divisor 8)], constraints={"flops": ...})``, the
  FLOPs constraint bisected until our counter lands on the target. Optional (needs nvidia-modelopt).

Torch-Pruning 1.6 crashes on EDSR's PixelShuffle upsampler (IndexError); here each ``conv + PixelShuffle(r)`` is
wrapped in one module with a custom pruner whose unit is one post-shuffle channel (r*r conv rows), and the
importances read that module's weights per unit (``ShuffleConv``, ``shuffle_aware``).

Peers are optional benchmark dependencies (never runtime ones): run with an environment that has torch-pruning
(and nvidia-modelopt), e.g. ``PYTHONPATH=/tmp/peers-p2/site``. Resumable: rows already in the results file are
skipped; results are written atomically after every row. Results: benchmarks/results/peers.json and .md.

    nice -n 15 python benchmarks/peers.py [--budgets 0.4] [--seeds 0] [--methods ...] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from edsr_channels import nominal, row, stage_seconds  # noqa: E402
from sls_deploy.modalities import registry as modalities  # noqa: E402
from sls_deploy.config.recipe import resolve_recipe  # noqa: E402
from sls_deploy.core import atomic  # noqa: E402
from sls_deploy.core.checkpoints import save_weights  # noqa: E402
from sls_deploy.core.errors import SlsError  # noqa: E402
from sls_deploy.pruning.channels.costs import GroupCosts  # noqa: E402
from sls_deploy.pruning.channels.groups import producers_of  # noqa: E402
from sls_deploy.stages.build import build_bundle  # noqa: E402
from sls_deploy.backends.loading import load_model, resolve_base_weights  # noqa: E402
from sls_deploy.pruning.channels.search import units_record  # noqa: E402

METHODS = ["ours", "ours-distill-output", "ours-distill-features", "tp-l1-stream-ignored", "tp-taylor-stream-ignored", "tp-groupnorm-stream-ignored",
           "tp-l1-stream-pruned", "tp-taylor-stream-pruned", "tp-groupnorm-stream-pruned", "modelopt-fastnas"]
TP_ROUND_TO = 8
ROUND_TOS = (8, 4, 1)
TAYLOR_BATCHES = 16  # as many batches as our Fisher ranking reads (stages/search.FISHER_BATCHES)
STREAM = "stream"


# -- Torch-Pruning: the PixelShuffle upsampler as one prunable unit ---------------------------------------------------
class ShuffleConv(nn.Module):
    """conv followed by PixelShuffle(r): output unit i is conv rows i*r*r .. i*r*r + r*r - 1."""

    def __init__(self, conv: nn.Conv2d, r: int):
        super().__init__()
        self.conv, self.r = conv, r

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), self.r)


def wrap_shuffles(model: nn.Module) -> None:
    """Every ``upsample[i]`` conv followed by a PixelShuffle becomes ``ShuffleConv`` (the shuffle an Identity)."""
    ups = model.upsample
    for i in range(len(ups) - 1):
        if isinstance(ups[i], nn.Conv2d) and isinstance(ups[i + 1], nn.PixelShuffle):
            ups[i] = ShuffleConv(ups[i], ups[i + 1].upscale_factor)
            ups[i + 1] = nn.Identity()


def unwrap_shuffles(model: nn.Module) -> None:
    ups = model.upsample
    for i in range(len(ups) - 1):
        if isinstance(ups[i], ShuffleConv):
            ups[i + 1] = nn.PixelShuffle(ups[i].r)
            ups[i] = ups[i].conv


def tp_pruner_cls():
    import torch_pruning as tp

    class ShuffleConvPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = ShuffleConv

        def prune_out_channels(self, layer, idxs):
            rr = layer.r * layer.r
            tp.prune_conv_out_channels(layer.conv, [i * rr + k for i in idxs for k in range(rr)])
            return layer

        def prune_in_channels(self, layer, idxs):
            tp.prune_conv_in_channels(layer.conv, idxs)
            return layer

        def get_out_channels(self, layer):
            return layer.conv.out_channels // (layer.r * layer.r)

        def get_in_channels(self, layer):
            return layer.conv.in_channels

    return ShuffleConvPruner


def shuffle_aware(base_cls, pruner, taylor: bool):
    """``base_cls`` (a Torch-Pruning group importance) that also scores ``ShuffleConv`` items, per post-shuffle
    unit (out) or input channel (in): sum |w|^p (magnitude) or sum |w * dw| (Taylor) over the unit's weights."""

    class ShuffleAware(base_cls):
        def _local(self, conv, out: bool, idxs):
            w = conv.weight
            v = (w.data * w.grad.data).abs() if taylor else w.data.abs().pow(self.p)
            if out:
                return v.reshape(conv.out_channels // self._rr, -1).sum(1)[idxs]
            return v.transpose(0, 1).flatten(1).sum(1)[idxs]

        @torch.no_grad()
        def __call__(self, group):
            extra, extra_idx = [], []
            for i, (dep, idxs) in enumerate(group):
                if isinstance(dep.layer, ShuffleConv):
                    self._rr = dep.layer.r ** 2
                    out = dep.pruning_fn == pruner.prune_out_channels
                    extra.append(self._local(dep.layer.conv, out, idxs).float())
                    extra_idx.append(group[i].root_idxs)
            self._extra = (extra, extra_idx)
            imp = super().__call__(group)
            if imp is None and extra:
                imp = self._normalize(base_cls._reduce(self, extra, extra_idx), self.normalizer)
            self._extra = ([], [])
            return imp

        def _reduce(self, group_imp, group_idxs):
            extra, extra_idx = getattr(self, "_extra", ([], []))
            return super()._reduce(list(group_imp) + extra, list(group_idxs) + extra_idx)

    return ShuffleAware


class TPSelection:
    """Torch-Pruning on the recipe's EDSR: kept units per channel group at a pruning ratio (nothing is sliced:
    the interactive step's groups give the indices)."""

    def __init__(self, recipe, model: nn.Module, kind: str, stream: bool, reg: float | None = None,
                 round_to: int = TP_ROUND_TO):
        self.round_to = round_to
        import torch_pruning as tp
        self.tp, self.recipe, self.model, self.kind, self.stream, self.reg = tp, recipe, model, kind, stream, reg
        wrap_shuffles(model)
        self.pruner_fn = tp_pruner_cls()()
        if kind == "taylor":
            self.importance = shuffle_aware(tp.importance.GroupTaylorImportance, self.pruner_fn, True)()
        else:
            self.importance = shuffle_aware(tp.importance.GroupMagnitudeImportance, self.pruner_fn, False)(
                p=2 if kind == "groupnorm" else 1)
        names = {m: n for n, m in model.named_modules()}
        self.names = names
        ignored = [model.conv_last]
        if not stream:
            ignored += [model.conv_first, model.conv_after_body] + [b.conv2 for b in model.body]
        self.ignored = ignored
        self.example = torch.randn(1, 3, 16, 16)

    def pruner(self, ratio: float):
        tp = self.tp
        cls = tp.pruner.GroupNormPruner if self.kind == "groupnorm" else tp.pruner.MetaPruner
        extra = {"reg": self.reg} if self.kind == "groupnorm" and self.reg is not None else {}
        return cls(self.model, self.example, importance=self.importance, global_pruning=True,
                   pruning_ratio=ratio, ignored_layers=self.ignored, round_to=self.round_to,
                   customized_pruners={ShuffleConv: self.pruner_fn},
                   root_module_types=[nn.Conv2d, nn.Linear, ShuffleConv], **extra)

    def at(self, ratio: float):
        """One pruner (its dependency graph traced once) re-aimed at ``ratio``."""
        if getattr(self, "_pruner", None) is None:
            self._pruner = self.pruner(ratio)
        p = self._pruner
        p.reset()
        p.pruning_ratio = ratio
        p.per_step_pruning_ratio = p.iterative_pruning_ratio_scheduler(ratio, p.iterative_steps)
        return p

    def units(self, groups, costs: GroupCosts, ratio: float) -> dict[str, list[int]]:
        """{group: kept units} Torch-Pruning chooses at ``ratio`` (pruned groups only)."""
        by_index = {producers_of(g)[0]: g.name for g in groups}
        by_index.update({f"upsample.{i}": f"upsample.{i}" for i, m in enumerate(self.model.upsample)
                         if isinstance(m, ShuffleConv)})
        pruned: dict[str, set[int]] = {}
        self.names = {m: n for n, m in self.model.named_modules()}  # the shuffles may have been re-wrapped
        for group in self.at(ratio).step(interactive=True):
            for dep, idxs in group:
                name = self.names.get(dep.layer)
                fn = dep.pruning_fn
                out = fn in (self.tp.prune_conv_out_channels, self.pruner_fn.prune_out_channels)
                if out and name in by_index:
                    pruned.setdefault(by_index[name], set()).update(int(i) for i in idxs)
        return {g: [i for i in range(costs.units[g]) if i not in p] for g, p in pruned.items()}


# -- equal MACs ----------------------------------------------------------------------------------------------------
def group_costs(recipe, model):
    groups = recipe.adapter.channel_groups(model)
    h, w = recipe.reference_input_hw()
    return groups, GroupCosts.measure(recipe.adapter.export_module(model), groups,
                                      recipe.adapter.example_input(recipe.model, h, w))


def bisect_ratio(select, costs: GroupCosts, target: float, tol: float, lo=0.0, hi=0.95, iters=16):
    """(knob, units, ratio) of ``select(knob) -> units`` whose MACs ratio is closest to ``target`` (MACs fall as
    the knob grows); stops once within ``tol``."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        units = select(mid)
        r = costs.ratio({g: len(u) for g, u in units.items()})
        if best is None or abs(r / target - 1) < abs(best[2] / target - 1):
            best = (mid, units, r)
        if abs(r / target - 1) <= tol / 2:
            break
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return best


# -- peers' own training (GroupNormPruner's sparse phase) ---------------------------------------------------------
def sparse_train(recipe, model, pruner, steps: int, seed: int) -> None:
    """``steps`` steps of the recipe's finetune (L1 loss, Adam at finetune.lr, its batches) with Torch-Pruning's
    ``pruner.regularize`` after every backward (GroupNormPruner's sparse training)."""
    torch.manual_seed(seed)
    data = modalities.sampler(recipe, "image", recipe.data_train, seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.finetune.lr)
    model.train()
    for _ in range(steps):
        x, y = data.batch()
        loss = F.l1_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize(model)
        opt.step()
    model.eval()


def taylor_grads(recipe, model, seed: int) -> None:
    """Gradients of the L1 loss summed over ``TAYLOR_BATCHES`` training batches (GroupTaylorImportance's input)."""
    data = modalities.sampler(recipe, "image", recipe.data_train, seed + 7919)
    model.zero_grad()
    for _ in range(TAYLOR_BATCHES):
        x, y = data.batch()
        F.l1_loss(model(x), y).backward()


# -- ModelOpt FastNAS ------------------------------------------------------------------------------------------------
def fastnas_units(recipe, base: Path, target: float, tol: float, seed: int, log):
    """Kept units of a FastNAS subnet whose MACs ratio by our counter is closest to ``target`` (the FLOPs
    constraint bisected). FastNAS sorts channels before slicing, so kept indices are recovered by matching each
    kept output channel's bias to the dense layer's."""
    import modelopt.torch.prune as mtp
    dense = load_model(recipe, base)
    groups, costs = group_costs(recipe, dense)
    data = modalities.sampler(recipe, "image", recipe.data_train, seed + 104729)
    batches = [data.batch() for _ in range(4)]

    def score(m):
        with torch.no_grad():
            return -float(sum(F.l1_loss(m(x), y) for x, y in batches))

    def select(frac):
        m = load_model(recipe, base)
        cfg = [("fastnas", {"nn.Conv2d": {"*": {"channel_divisor": 8}}})]
        m, _ = mtp.prune(m, mode=cfg, constraints={"flops": f"{100 * (1 - frac):.2f}%"},
                         dummy_input=torch.randn(1, 3, 32, 32),
                         config={"data_loader": batches, "score_func": score, "checkpoint": None,
                                 "collect_func": lambda b: b[0], "max_iter_data_loader": 1})
        units = {}
        mods = dict(m.named_modules())
        for g in groups:
            prod = mods[producers_of(g)[0]]
            dense_b = dict(dense.named_modules())[producers_of(g)[0]].bias.detach()
            rr = g.unit if hasattr(g, "unit") else 1
            b = prod.bias.detach()
            if b.numel() == dense_b.numel():
                continue
            idx = sorted({int((dense_b == v).nonzero()[0]) // rr for v in b})
            units[g.name] = idx
        log(f"  fastnas flops {100 * (1 - frac):.1f}%: ratio {costs.ratio({k: len(v) for k, v in units.items()}):.4f}")
        return units

    return bisect_ratio(select, costs, target, tol, lo=max(0.0, 0.9 - target), hi=min(0.95, 1.1 - target), iters=5)


# -- rows -------------------------------------------------------------------------------------------------------------
def kept_units(args, recipe, method: str, target: float, seed: int, steps: int, work: Path, log):
    """(units file, steps left for the finetune, keep_full, seconds, knob) of a peer's selection at ``target``."""
    base = resolve_base_weights(recipe, None)
    t0 = time.perf_counter()
    if method == "modelopt-fastnas":
        knob, units, ratio = fastnas_units(recipe, base, target, args.tol, seed, log)
        shared, left, stream = base, steps, True
    else:
        kind, stream = method.split("-")[1], method.endswith("pruned")
        model = load_model(recipe, base)
        groups, costs = group_costs(recipe, model)
        torch.manual_seed(seed)
        sel = TPSelection(recipe, model, kind, stream, reg=args.gn_reg)
        shared, left = base, steps
        if kind == "taylor":
            taylor_grads(recipe, model, seed)
        if kind == "groupnorm":
            sparse = round(steps * recipe.structured.ssl_steps / recipe.finetune.steps)
            sparse_train(recipe, model, sel.pruner(0.5), sparse, seed)
            left = steps - sparse
            unwrap_shuffles(model)
            shared = work / "sparse.safetensors"
            save_weights(model, shared, {"plan": "tp-groupnorm sparse training", "steps": str(sparse)})
            wrap_shuffles(model)
        for rt in ROUND_TOS:  # Torch-Pruning's round_to 8 can miss the target by more than --tol: then finer
            sel.round_to, sel._pruner = rt, None
            knob, units, ratio = bisect_ratio(lambda r: sel.units(groups, costs, r), costs, target, args.tol)
            if abs(ratio / target - 1) <= args.tol:
                break
        knob = (knob, rt)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "units.json"
    atomic.write_json(path, units_record(shared, units))
    log(f"  {method}: knob {knob} -> MACs {ratio:.4f} (target {target:.4f}); widths "
        + " ".join(f"{g}={len(u)}" for g, u in units.items()))
    return path, left, (() if stream else None), time.perf_counter() - t0, knob, ratio


def copy_search(ours: Path, out: Path) -> None:
    """``out`` as ``ours`` stood after its search stage (later stages dropped), unless ``out`` exists already."""
    if out.exists():
        return
    manifest = json.loads((ours / "manifest.json").read_text())
    if "search" not in manifest.get("stages", {}):
        raise SlsError(f"{ours} has no finished search stage yet")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ours, tmp, ignore=shutil.ignore_patterns("*.ckpt", "*.onnx", "report*", "*.lock"))
    manifest["stages"] = {"search": manifest["stages"]["search"]}
    atomic.write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    tmp.rename(out)


def build_row(args, recipe, method: str, budget: float, seed: int, target: float | None, log) -> dict:
    out = Path(args.out) / f"{method}-b{budget:.2f}-s{seed}-n{args.steps}"
    t0 = time.perf_counter()
    extra = {}
    try:
        if method.startswith("ours"):
            ssl = round(recipe.structured.ssl_steps * args.steps / recipe.finetune.steps)
            kd = {}
            if method != "ours":  # ours' search, copied, finetuned with a teacher
                kd = {"distill_weight": args.kd_weight,
                      **({"feature_distill_weight": args.fkd_weight} if method.endswith("features") else {})}
                copy_search(Path(args.out) / f"ours-b{budget:.2f}-s{seed}-n{args.steps}", out)
                extra = {"distill": kd}
            rep = build_bundle(recipe, out, budget=budget, seed=seed, steps=args.steps, ssl_steps=ssl,
                               precisions=tuple(args.precisions), progress=False, log=lambda s: None, **kd)
            sel_s = 0.0
        else:
            path, left, keep_full, sel_s, knob, ratio = kept_units(args, recipe, method, target, seed, args.steps,
                                                                   out.with_name(out.name + "-select"), log)
            b = math.ceil(ratio * 1e4) / 1e4 + 1e-4
            cli = {"keep_full": keep_full} if keep_full is not None else {}
            rep = build_bundle(recipe, out, budget=b, method="l1", seed=seed, steps=left, units=str(path),
                               precisions=tuple(args.precisions), progress=False, log=lambda s: None, **cli)
            extra = {"knob": knob, "finetune_steps": left, "select_seconds": round(sel_s, 1)}
    except (SlsError, RuntimeError, ValueError, IndexError, ImportError) as e:
        log(f"{method} at {budget} seed {seed}: {type(e).__name__}: {str(e)[:300]}")
        return {"method": method, "budget": budget, "seed": seed, "steps": args.steps,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}
    r = row(method, budget, rep, stage_seconds(out, time.perf_counter() - t0) + sel_s)
    r.pop("config")
    r = {"method": method, "seed": seed, "steps": args.steps, **r, **extra}
    if target:
        r["macs_vs_ours"] = round(r["macs_ratio"] / target, 4)
    log(f"{method:28s} b{budget} s{seed}: MACs {r['macs_ratio']:.4f}, PSNR-Y {r['psnr_y']:.3f} "
        f"({-r['drop_db']:+.3f}), latency {r['latency_ratio']:.3f}x, {r['build_seconds']:.0f} s")
    return r


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for mod, name in (("torch_pruning", "torch-pruning"), ("modelopt", "nvidia-modelopt")):
        try:
            from importlib.metadata import version
            out.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - not installed: say so
            out.append(f"{name} not installed")
    return ", ".join(out)


HEADER = """EDSR-baseline x4 (the shipped recipe), dense eval PSNR-Y {dense}. Every row: the same training steps after
the base model (`steps`; ours: ssl_steps = recipe ssl_steps x steps / recipe steps; tp-groupnorm: the same share
as sparse training, the rest finetuning), the recipe's finetune settings (lr, batch, patch), seed as given, and
MACs within --tol of ours by our counter (`vs ours`). Peers only select kept channels; our build (method l1
with a kept-units file) finetunes, exports the FP32 graph and validates it. PSNR-Y on the recipe's eval images;
latency: ONNX Runtime CPU, pruned/dense medians, interleaved (the validate stage). build s: the peer's
selection (and sparse training) plus the build's stages. Versions: {versions}.

"""


NOTES = """
How each peer was run (this file's rows; `benchmarks/peers.py`):

- Environment: the project's venv plus, on `PYTHONPATH` only, `pip install --target /tmp/peers-p2/site --no-deps
  torch-pruning nvidia-modelopt torchprofile==0.0.4 pulp` and ModelOpt's import-time needs, also `--no-deps`:
  requests urllib3 idna certifi omegaconf huggingface_hub==0.26.5 (the newest imports httpx2) pydantic
  pydantic_core typing_inspection annotated_types rich regex. Nothing of it is a runtime dependency.
- Torch-Pruning: `MetaPruner` (L1: `GroupMagnitudeImportance(p=1)`; Taylor: `GroupTaylorImportance`, gradients
  of the L1 loss summed over 16 training batches) or `GroupNormPruner` (`GroupMagnitudeImportance(p=2)`, its
  default reg 1e-4, `regularize` after every backward of a sparse phase of the same share of the steps as our
  ssl penalty phase, Adam at the recipe's finetune lr), `global_pruning=True`, `conv_last` ignored; "stream
  ignored" also ignores every stream producer (conv_first, body.*.conv2, conv_after_body). EDSR's
  `conv + PixelShuffle(2)` crashes Torch-Pruning 1.6 (IndexError); each pair is wrapped in one module
  (`ShuffleConv`) with a custom pruner (unit = one post-shuffle channel = 4 conv rows), added to
  `root_module_types`, and the importances score it per unit (without that its groups are never pruned and the
  MACs cannot go under ~0.54). The pruning ratio is bisected until our counter lands within 0.5% of ours'
  MACs; `round_to` 8 first, then 4, then 1 (at 0.4 neither 8 nor 4 landed within 0.5%, so the rows keep any
  channel count, which costs them ORT latency). Only the kept indices are read (interactive `step`), nothing is
  sliced by Torch-Pruning.
- ModelOpt FastNAS: `mtp.prune(mode=[("fastnas", {"nn.Conv2d": {"*": {"channel_divisor": 8}}})],
  constraints={"flops": "x%"})`, score = -L1 on 4 training batches; its search space leaves both upsampler
  convs' outputs at 256 (about 37% of the MACs). Kept indices are recovered by matching each kept output
  channel's bias to the dense layer's (FastNAS sorts channels before slicing).
- `ours-distill-output` / `ours-distill-features`: the `ours` row's own bundle after its search stage (copied:
  the same kept channels and search weights, so the row differs from `ours` only in its finetuning), finetuned for
  the same steps with the dense model as teacher: `--distill-weight 1` (output L1), and for `-features` also
  `--feature-distill-weight 0.1` (every residual block's output). `build s` counts the copied search's seconds.
- Every selection is written as a kept-units file (`units_record`, the nested-family format) and built by
  `build_bundle(method="l1", units=...)`: our finetune (recipe lr, batch, patch), export, validate.
"""


def table(rows: list[dict]) -> str:
    dense = next((f"{r['psnr_dense']:.3f} dB" for r in rows if "psnr_dense" in r), "not measured")
    lines = [HEADER.format(dense=dense, versions=versions()) + "| budget | seed | steps | method | MACs ratio | vs ours | PSNR-Y dB | drop dB | ORT latency pruned/dense "
             "| build s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['seed']} | {r['steps']} | {r['method']} | - | - | - | - | - | "
                         f"{r['error'][:120]} |")
            continue
        vs = r.get("macs_vs_ours")
        lines.append(f"| {r['budget']} | {r['seed']} | {r['steps']} | {r['method']} | {r['macs_ratio']:.4f} | "
                     f"{'-' if vs is None else f'{(vs - 1) * 100:+.2f}%'} | {r['psnr_y']:.3f} | {-r['drop_db']:+.3f} | "
                     f"{r['latency_ratio']:.3f}x | {r['build_seconds']:.0f} |")
    return "\n".join(lines) + "\n" + summary(rows) + NOTES


def summary(rows: list[dict]) -> str:
    """Per budget and step count: each method's mean over its seeds, and the paired lead of ours and of
    ours-distill-output over it (mean over the seeds both have)."""
    ok = [r for r in rows if "error" not in r]
    groups = sorted({(nominal(r["budget"]), r["steps"]) for r in ok}, key=lambda k: (-k[1], k[0]))
    out = ["", "Means over seeds (`n`: seeds). Leads are paired: the mean, over the seeds both rows have, of the "
           "PSNR-Y difference.", "",
           "| budget | steps | method | n | MACs ratio | PSNR-Y dB | drop dB | ours' lead dB | ours-distill-output's "
           "lead dB |", "|---|---|---|---|---|---|---|---|---|"]
    for budget, steps in groups:
        here = [r for r in ok if nominal(r["budget"]) == budget and r["steps"] == steps]
        by = {}
        for r in here:
            by.setdefault(r["method"], {})[r["seed"]] = r
        for method in sorted(by, key=lambda m: METHODS.index(m) if m in METHODS else 99):
            seeds = by[method]
            mean = lambda k: sum(r[k] for r in seeds.values()) / len(seeds)  # noqa: E731

            def lead(ref: str) -> str:
                if ref == method or ref not in by:
                    return "-"
                common = sorted(set(by[ref]) & set(seeds))
                if not common:
                    return "-"
                d = [by[ref][s]["psnr_y"] - seeds[s]["psnr_y"] for s in common]
                return f"{sum(d) / len(d):+.3f} (n={len(d)})"

            out.append(f"| {budget} | {steps} | {method} | {len(seeds)} | {mean('macs_ratio'):.4f} | "
                       f"{mean('psnr_y'):.3f} | {-mean('drop_db'):+.3f} | {lead('ours')} | "
                       f"{lead('ours-distill-output')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.25, 0.6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, default=None, help="training steps after the base model, every method "
                    "(default: the recipe's finetune.steps); ours scales ssl_steps by the same factor")
    ap.add_argument("--tol", type=float, default=0.005, help="peers land within this of ours' MACs ratio")
    ap.add_argument("--kd-weight", type=float, default=1.0, help="ours-distill-*: --distill-weight (output L1)")
    ap.add_argument("--fkd-weight", type=float, default=0.1, help="ours-distill-features: --feature-distill-weight")
    ap.add_argument("--gn-reg", type=float, default=None, help="GroupNormPruner reg (default: Torch-Pruning's)")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], help="graphs each build exports (the table reads "
                    "the FP32 graph's PSNR and latency; the recipe's fp16/int8 only add build time)")
    ap.add_argument("--recipe", default="edsr")
    ap.add_argument("--out", default="runs/peers")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from the results file")
    ap.add_argument("--merge", nargs="+", default=[], help="results files of parallel runs (each with its own "
                    "--results) whose rows join this one's first")
    args = ap.parse_args()
    recipe = resolve_recipe(args.recipe, None)
    args.steps = args.steps or recipe.finetune.steps
    dest = Path(args.results)
    rows = json.loads(dest.read_text())["rows"] if dest.is_file() else []
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
    for other in args.merge:
        for r in json.loads(Path(other).read_text())["rows"]:
            rows[:] = [x for x in rows if not (x["method"] == r["method"] and x["budget"] == r["budget"]
                                                 and x["seed"] == r["seed"] and x["steps"] == r["steps"])] + [r]
    if args.report:
        rows.sort(key=lambda r: (-nominal(r["budget"]), r["steps"], r["seed"], METHODS.index(r["method"])))
        atomic.write_text(dest, json.dumps({"rows": rows}, indent=2) + "\n")
        atomic.write_text(dest.with_suffix(".md"), table(rows))
        return 0

    def find(method, budget, seed):
        return next((r for r in rows if r["method"] == method and nominal(r["budget"]) == budget
                     and r["seed"] == seed and r["steps"] == args.steps and "error" not in r), None)

    def save():
        rows.sort(key=lambda r: (-nominal(r["budget"]), r["steps"], r["seed"], METHODS.index(r["method"])
                                 if r["method"] in METHODS else 99))
        atomic.write_text(dest, json.dumps({"rows": rows}, indent=2) + "\n")
        atomic.write_text(dest.with_suffix(".md"), table(rows))

    for budget in args.budgets:
        for seed in args.seeds:
            for method in (["ours"] + [m for m in args.methods if m != "ours"]):
                if find(method, budget, seed) or method not in args.methods:
                    continue  # ours first (the peers' MACs target), when asked for (a parallel run has it)
                ours = find("ours", budget, seed)
                target = ours["macs_ratio"] if ours else None
                if method != "ours" and target is None and not method.startswith("ours-"):
                    log(f"no ours row at {budget} seed {seed}: skipping {method}")
                    continue
                r = build_row(args, recipe, method, budget, seed, target, log)
                rows[:] = [x for x in rows if not (x["method"] == method and nominal(x["budget"]) == budget
                                                     and x["seed"] == seed and x["steps"] == args.steps)]
                rows.append(r)
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
