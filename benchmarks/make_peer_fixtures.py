#!/usr/bin/env python3
"""The fixtures of `sls-deploy import-pruned` (tests/fixtures/peers/), made once with the real tools.

A tiny EDSR (the tests' tiny recipe: x4, 16 channels, 2 blocks), built by this project's adapter with seeded
random weights, is channel-pruned by each peer tool and saved in that tool's own format:

- ``tp_edsr_tiny.pth``: Torch-Pruning 1.6.1, ``MagnitudePruner`` with group L1 importance
  (``GroupMagnitudeImportance(p=1)``), 50% of the channels of every group including the residual stream (the
  dependency graph prunes the stream's producers together), saved with ``torch.save(tp.state_dict(model))``.
  Torch-Pruning 1.6.1 crashes on EDSR's PixelShuffle upsampler (``IndexError: index 64 is out of bounds``): it
  treats PixelShuffle as a channel-preserving op, so the upsampler convs (``upsample.0``, ``upsample.2``) are in
  ``ignored_layers``: their output channels stay whole (their input channels, the stream, are still pruned).
- ``modelopt_edsr_tiny.pth``: NVIDIA ModelOpt 0.47.0, FastNAS (``mtp.prune(mode="fastnas")``, a FLOPs
  constraint of 80% (its smallest subnet is 72%: the upsampler it leaves whole dominates), ``channel_divisor`` 4 on the 16-channel convs), saved with ``mto.save(model, path)``.
  ModelOpt's search space leaves the upsampler whole too.

Beside them: ``edsr_tiny_dense.safetensors`` (the dense weights both were pruned from) and
``reference.safetensors`` (a seeded input and each pruned model's output on it, computed here in the tool's
own process: the tests compare the imported model against these) and ``kept_units.json`` (each tool's kept
units per group: Torch-Pruning's from its pruning history, ModelOpt's by exact equality of each pruned filter
with a dense one).

Neither tool is a dependency of sls-deploy. To make the fixtures again (the project's venv, the tools beside it):

    pip install --target /tmp/peers-site --no-deps torch-pruning==1.6.1 nvidia-modelopt==0.47.0 torchprofile==0.0.4
    pip install --target /tmp/peers-site pydantic rich pulp ninja requests huggingface_hub
    PYTHONPATH=/tmp/peers-site python benchmarks/make_peer_fixtures.py

ModelOpt installs with ``--no-deps`` (its pinned dependencies would replace the project's torch) plus the few
packages it imports; torchprofile 0.0.4 works where 0.1.0 fails on import.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sls_deploy.models.edsr import EDSRAdapter  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "peers"
TINY = {"arch": "edsr", "scale": 4, "num_feat": 16, "num_block": 2, "res_scale": 1.0}  # tests/conftest.py's


def dense_model() -> torch.nn.Module:
    adapter = EDSRAdapter()
    torch.manual_seed(0)
    model = adapter.build(adapter.parse_config(TINY)).eval()
    with torch.no_grad():  # spread weights: every channel distinct, importances unequal
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def torch_pruned(model: torch.nn.Module, example: torch.Tensor) -> tuple[dict, dict]:
    """(tp.state_dict of the pruned model, {group: kept units} from Torch-Pruning's own pruning history)."""
    import torch_pruning as tp

    ignored = [model.upsample[0], model.upsample[2], model.conv_last]  # PixelShuffle: see the docstring
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=ignored, global_pruning=False)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    pruner.step()
    removed: dict[str, set] = {}
    for name, is_out, idxs in pruner.pruning_history():
        if is_out:
            removed.setdefault(name, set()).update(int(i) for i in idxs)
    groups = {"stream": ("conv_first", "body.0.conv2", "body.1.conv2", "conv_after_body"),  # the history names
              "body.0.conv1": ("body.0.conv1",), "body.1.conv1": ("body.1.conv1",)}  # the stream by one of them
    kept = {g: sorted(set(range(dense[layers[0]])) - set().union(*(removed.get(l, set()) for l in layers)))
            for g, layers in groups.items()}
    return tp.state_dict(model), kept


def modelopt_pruned(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.nn.Module:
    import modelopt.torch.opt as mto
    import modelopt.torch.prune as mtp

    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 3, 8, 8, generator=g) for _ in range(4)]

    def score(m):  # FastNAS ranks subnets by this: closeness to the dense output
        with torch.no_grad():
            return -float(sum((m(x) - ref).abs().mean() for x, ref in zip(batches, refs)))

    with torch.no_grad():
        refs = [model(x) for x in batches]
    config = {"nn.Conv2d": {"*": {"channel_divisor": 4}}}
    pruned, _ = mtp.prune(model, mode=[("fastnas", config)], constraints={"flops": "80%"}, dummy_input=example,
                          config={"data_loader": batches, "score_func": score,
                                  "checkpoint": str(path.with_suffix(".search.pth"))})
    mto.save(pruned, str(path))
    return pruned


def modelopt_kept(dense: torch.nn.Module, pruned: torch.nn.Module) -> dict:
    """{group: kept units} of the FastNAS subnet: the dense filter each pruned filter equals (bias and weight at
    the kept stream channels; ModelOpt keeps no record of them, and sorts channels by importance)."""
    def find(layer: str, cols=None) -> list[int]:
        d, p = dense.get_submodule(layer), pruned.get_submodule(layer)
        w = d.weight if cols is None else d.weight[:, cols]
        return [next(j for j in range(d.out_channels) if torch.equal(d.bias[j], p.bias[i]) and torch.equal(w[j], p.weight[i]))
                for i in range(p.out_channels)]

    stream = find("conv_first")
    return {"stream": sorted(stream), **{f"body.{i}.conv1": sorted(find(f"body.{i}.conv1", stream)) for i in range(2)}}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dense = dense_model()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(OUT / "edsr_tiny_dense.safetensors"))
    ref = {"input": example}

    model = dense_model()
    sd, kept_tp = torch_pruned(model, example)
    torch.save(sd, OUT / "tp_edsr_tiny.pth")
    with torch.no_grad():
        ref["tp_output"] = model.eval()(example)

    model = dense_model()
    path = OUT / "modelopt_edsr_tiny.pth"
    pruned = modelopt_pruned(model, example, path)
    search = path.with_suffix(".search.pth")
    if search.exists():
        search.unlink()
    with torch.no_grad():
        ref["modelopt_output"] = pruned.eval()(example)
    kept = {"torch-pruning": kept_tp, "modelopt": modelopt_kept(dense, pruned)}
    (OUT / "kept_units.json").write_text(json.dumps(kept, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(OUT / "reference.safetensors"))
    print(f"torch-pruning {version('torch-pruning')}, nvidia-modelopt {version('nvidia-modelopt')}, "
          f"torchprofile {version('torchprofile')}, torch {torch.__version__}")
    for name in ("tp_edsr_tiny.pth", "modelopt_edsr_tiny.pth", "edsr_tiny_dense.safetensors", "reference.safetensors"):
        print(f"{name}: {(OUT / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
