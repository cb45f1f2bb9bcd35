"""Safe checkpoint reading and the fit check against a recipe's model.

Only safetensors files and ``torch.load(weights_only=True)`` are used: an untrusted pickle is never executed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sls_deploy.core.atomic import atomic_path
from sls_deploy.core.errors import CheckpointError

# Keys under which training frameworks nest the weights, in order of preference.
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "model_state_dict")


SAFE_FORMATS = ".safetensors, or a .pt/.pth holding only tensors (and dicts/lists of them)"


def load_refusal(path: str | os.PathLike, e: BaseException) -> str:
    """One line of our own for a ``torch.load(weights_only=True)`` failure. PyTorch's paragraph suggests
    ``weights_only=False``, which would run whatever code the pickle holds: never repeated to a user."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return (f"{path} is a pickle that needs code ({m.group(1)}) to load, and that code is never run; "
                f"give {SAFE_FORMATS}")
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return (f"cannot read {path}: not a checkpoint of tensors (corrupt, or other pickled objects); "
                f"give {SAFE_FORMATS}")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"cannot read {path} as a weights-only checkpoint: {first}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} dict from .safetensors or a .pt/.pth checkpoint (BasicSR wrappers unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors (corrupt or truncated?): {e}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about odd pickles; the one-line error below says it
                warnings.simplefilter("ignore")
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean the same to a user
            raise CheckpointError(load_refusal(path, e)) from None
    for _ in range(2):  # e.g. {"state_dict": {"params": ...}} is not seen in practice, but one nesting is
        if isinstance(sd, Mapping):
            for key in _WRAPPER_KEYS:
                if isinstance(sd.get(key), Mapping):
                    sd = sd[key]
                    break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{path} holds no state dict of tensors")
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key[7:] if key.startswith("module.") else key] = value
    if not out:
        raise CheckpointError(f"{path} holds no tensors")
    return out


def check_fit(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming the first key that does not fit ``model`` (missing, shape, unexpected)."""
    own = model.state_dict()
    for key, ref in own.items():
        if key not in sd:
            raise CheckpointError(f"checkpoint does not fit {what}: key '{key}' is missing from the checkpoint")
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"checkpoint does not fit {what}: key '{key}' has shape {tuple(sd[key].shape)}, "
                f"the recipe's model needs {tuple(ref.shape)}")
    for key in sd:
        if key not in own:
            raise CheckpointError(f"checkpoint does not fit {what}: unexpected key '{key}' "
                                  "(deeper/wider model, or another architecture?)")


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Check the fit, then copy the weights (any float dtype) into ``model`` in its own dtype."""
    check_fit(model, sd, what)
    own = model.state_dict()
    for k in own:
        v = sd[k]
        if not own[k].is_floating_point():  # an index buffer (RSC): integer channel indices, in range, distinct
            if v.is_floating_point() or v.dtype == torch.bool:
                raise CheckpointError(f"{what}: index '{k}' is {str(v.dtype).removeprefix('torch.')}, not integer")
            if v.numel() and (int(v.min()) < 0 or len(set(v.tolist())) != v.numel()):
                raise CheckpointError(f"{what}: index '{k}' holds negative or repeated channel indices")
            continue
        if not v.is_floating_point():
            raise CheckpointError(f"{what}: weight '{k}' is {str(v.dtype).removeprefix('torch.')}, not a float tensor")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{what}: weight '{k}' holds NaN or infinite values")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})
    return model


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 half: bool = False) -> None:
    """The model's state dict as safetensors (FP16 if ``half``), written atomically."""
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
          for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        # one metadata entry: safetensors writes several in hash-map order, which changes from call to call, so
        # identical tensors would not give identical bytes (and hashes)
        meta = {"sls_deploy": json.dumps(dict(sorted(metadata.items())))} if metadata else None
        save_file(sd, str(tmp), metadata=meta)
