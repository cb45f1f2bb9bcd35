"""The weights of a channel-pruned model saved by another tool, read safely and without the tool.

- Torch-Pruning: ``torch.save(tp.state_dict(model))``, ``{"full_state_dict": {module: its __dict__},
  "attributions": ...}``. The module dicts hold the child modules themselves, so the file is no weights-only
  checkpoint: it is read by ``core.inert_pickle`` (no class imported, no code run) and only each module's
  ``_parameters`` and persistent ``_buffers`` are taken.
- NVIDIA ModelOpt: ``mto.save(model, path)``, ``{"modelopt_state": ..., "model_state_dict": ...}``; its state
  is plain types, read by ``torch.load(weights_only=True)`` (``core.inert_pickle`` if not). A sparsity model
  (2:4 masks, not channels) is pointed at ``import-sls``.
- a plain state dict of the narrower model (``.safetensors`` or a weights-only ``.pth``).

A whole pickled model (``torch.save(model)``) is refused from its opcodes alone, before anything is built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from sls_deploy.core.checkpoints import read_state_dict
from sls_deploy.core.errors import CheckpointError
from sls_deploy.core.inert_pickle import load_inert, pickle_bytes, top_level_class

TORCH_PRUNING, MODELOPT, STATE_DICT = "Torch-Pruning", "ModelOpt", "state dict"
SAFE_HINT = ("save torch.save(tp.state_dict(model)) (Torch-Pruning), mto.save(model, path) (ModelOpt) or the "
             "pruned model's state_dict()")


@dataclass
class PrunedFile:
    tool: str  # TORCH_PRUNING | MODELOPT | STATE_DICT
    state: dict[str, torch.Tensor]  # the narrower model's weights by name
    modes: list[str]  # ModelOpt's modes (e.g. ["fastnas", "export"]); [] for the others


def read_pruned_file(path: str | Path) -> PrunedFile:
    """The pruned model's weights and the tool that saved them; one-line CheckpointError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pruned model not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    if path.suffix == ".safetensors":
        return PrunedFile(STATE_DICT, read_state_dict(path), [])
    try:
        cls = top_level_class(pickle_bytes(path))
    except ValueError as e:
        raise CheckpointError(f"cannot read {path}: a malformed pickle ({str(e)[:80]})") from None
    if cls is not None:
        raise CheckpointError(f"{path} is a whole pickled object ({cls[:80]}), refused unread (loading it would run "
                              f"its code); {SAFE_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # objects inside (tp.state_dict's module dicts): read inert, nothing run
        obj = load_inert(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a pruned model's weights; {SAFE_HINT}")
    if isinstance(obj.get("full_state_dict"), Mapping) and "attributions" in obj:
        return PrunedFile(TORCH_PRUNING, _from_module_dicts(path, obj["full_state_dict"]), [])
    if "modelopt_state" in obj and isinstance(obj.get("model_state_dict"), Mapping):
        modes = _modes(obj["modelopt_state"])
        if any("sparse" in m for m in modes):
            raise CheckpointError(f"{path} is a ModelOpt sparsity model ({', '.join(modes)[:60]}: N:M masks, not "
                                  "pruned channels): import it with `sls-deploy import-sls`")
        return PrunedFile(MODELOPT, _tensors(path, obj["model_state_dict"]), modes)
    return PrunedFile(STATE_DICT, _tensors(path, obj), [])


def _tensors(path: Path, sd: Mapping) -> dict[str, torch.Tensor]:
    out = {str(k).removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path} holds no tensors; {SAFE_HINT}")
    return out


def _modes(state: Any) -> list[str]:
    """ModelOpt's mode names, from ``modelopt_state["modelopt_state_dict"]`` ([(mode, {...}), ...])."""
    entries = state.get("modelopt_state_dict", []) if isinstance(state, Mapping) else []
    return [str(e[0]) for e in entries if isinstance(e, (tuple, list)) and e]


def _from_module_dicts(path: Path, modules: Mapping) -> dict[str, torch.Tensor]:
    """{module.param: tensor} from Torch-Pruning's {module name: module __dict__} (persistent buffers too)."""
    out: dict[str, torch.Tensor] = {}
    for name, d in modules.items():
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{path}: Torch-Pruning entry '{str(name)[:60]}' is not a module's attributes")
        skip = d.get("_non_persistent_buffers_set")
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for kind in ("_parameters", "_buffers"):
            for key, value in (d.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and key in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: Torch-Pruning entry '{str(name)[:60]}.{str(key)[:30]}' is not "
                                          "a tensor")
                out[f"{name}.{key}" if name else str(key)] = value
    if not out:
        raise CheckpointError(f"{path} holds no tensors; {SAFE_HINT}")
    return out
