"""Where PyTorch runs: one resolver for ``--device`` / ``--amp`` / ``--channels-last`` and the recipe's ``compute``.

``resolve_compute`` turns the recipe's defaults and the command line into a ``Compute`` (the device, the autocast
mode, the memory format), refusing with a one-line UsageError (exit 2) what cannot work here: ``--device cuda``
without CUDA, ``cuda:N`` beyond the devices present, ``--amp fp16`` on a CPU. Under torchrun, ``cuda`` means
``cuda:LOCAL_RANK``. Everything else follows the model: ``model_device(model)`` is read from its parameters,
never hard-coded, and tensors meeting the model are created on (or moved to) that device. Checkpoints stay
device-independent: ``to_cpu`` before saving, ``map_location="cpu"`` when loading, then the model's device.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from sls_deploy.core.errors import UsageError, short_repr

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
AMP_MODES = ("off", "bf16", "fp16")
CHANNELS_LAST = ("off", "on", "cuda")  # "cuda": on when the device is a GPU (not measured on one: README)
_CUDA = re.compile(r"cuda(?::(\d{1,4}))?")


@dataclass(frozen=True)
class ComputeSection:
    """The recipe's ``compute:`` section (defaults of the options above); checked for form, not availability:
    a recipe names ``cuda`` on any machine, and it is refused only where it is used without CUDA."""

    device: str = "auto"
    amp: str = "off"
    channels_last: str = "off"

    def check(self, error=UsageError) -> "ComputeSection":
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or _CUDA.fullmatch(self.device)):
            raise error(f"compute.device must be {DEVICE_CHOICES}, not {short_repr(self.device)}")
        if self.amp not in AMP_MODES:
            raise error(f"compute.amp must be one of {', '.join(AMP_MODES)}, not {short_repr(self.amp)}")
        if self.channels_last not in CHANNELS_LAST:
            raise error(f"compute.channels_last must be one of {', '.join(CHANNELS_LAST)}, "
                        f"not {short_repr(self.channels_last)}")
        return self


@dataclass(frozen=True)
class Compute:
    """The resolved choice every PyTorch stage of a command runs with."""

    device: torch.device = torch.device("cpu")
    amp: str = "off"
    channels_last: bool = False

    def evaluating(self) -> "Compute":
        """The same device for evaluation, which runs in FP32 (no autocast) in the default memory format."""
        return Compute(self.device)

    def record(self) -> dict[str, Any]:
        """What the manifest records: device and its name, torch / CUDA / cuDNN versions, AMP mode."""
        return {"device": str(self.device), "device_name": device_name(self.device), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": (torch.backends.cudnn.version()
                                                      if self.device.type == "cuda" else None),
                "amp": self.amp, "channels_last": self.channels_last,
                "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def torchrun_local_rank() -> int | None:
    """LOCAL_RANK of a torchrun worker (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError(f"LOCAL_RANK must be an integer, not {short_repr(os.environ.get('LOCAL_RANK'))}") from None


def resolve_device(choice: str | None = None, what: str = "--device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device that exists here (one-line UsageError else)."""
    text = "auto" if choice is None else choice
    if not isinstance(text, str) or not (text in ("auto", "cpu") or _CUDA.fullmatch(text)):
        raise UsageError(f"{what} must be {DEVICE_CHOICES}, not {short_repr(text)}")
    local = torchrun_local_rank()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"{what} {text}: CUDA is not available here ({why}); use --device cpu or auto")
    count = torch.cuda.device_count()
    given = _CUDA.fullmatch(text).group(1)
    if given is not None and local is not None:
        raise UsageError(f"{what} {text} under torchrun would put every rank on one GPU; give --device cuda "
                         "(each rank uses cuda:LOCAL_RANK)")
    index = int(given) if given is not None else (local or 0)
    if index >= count:
        where = f"LOCAL_RANK {index}" if given is None else f"{what} {text}"
        raise UsageError(f"{where}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
                         + ("; start torchrun with --nproc-per-node at most that" if given is None else ""))
    return torch.device("cuda", index)


def check_amp(amp: str, device: torch.device, what: str = "--amp") -> str:
    if amp not in AMP_MODES:
        raise UsageError(f"{what} must be one of {', '.join(AMP_MODES)}, not {short_repr(amp)}")
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"{what} fp16 needs a CUDA device (float16 autocast with a gradient scaler); on "
                         f"{device.type} use --amp bf16 or off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{what} bf16: {device_name(device)} has no bfloat16 support; use --amp fp16 or off")
    return amp


def resolve_compute(section: ComputeSection | None = None, *, device: str | None = None, amp: str | None = None,
                    channels_last: str | None = None) -> Compute:
    """The recipe's ``compute`` defaults with the command line's values on top, checked here and now."""
    sec = section or ComputeSection()
    dev = resolve_device(device if device is not None else sec.device,
                         "--device" if device is not None else "the recipe's compute.device")
    mode = check_amp(amp if amp is not None else sec.amp, dev,
                     "--amp" if amp is not None else "the recipe's compute.amp")
    cl = channels_last if channels_last is not None else sec.channels_last
    if cl not in CHANNELS_LAST:
        raise UsageError(f"--channels-last must be one of {', '.join(CHANNELS_LAST)}, not {short_repr(cl)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the CUDA caching allocator use the current device
    return Compute(dev, mode, cl == "on" or (cl == "cuda" and dev.type == "cuda"))


def inference_device(section: ComputeSection | None = None, device: str | None = None) -> torch.device:
    """The device of a command that only evaluates (validate, upscale): ``--device`` or the recipe's."""
    sec = section or ComputeSection()
    dev = resolve_device(device if device is not None else sec.device,
                         "--device" if device is not None else "the recipe's compute.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (buffers if it has none; CPU if it has neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(x, device: torch.device):
    """A tensor (or a tuple/list of tensors) on ``device``; asynchronous from pinned memory on CUDA."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    return x.to(device, non_blocking=device.type == "cuda")


def to_cpu(obj):
    """Every tensor in a nested dict/list/tuple moved to the CPU (checkpoints load anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def autocast(device: torch.device, amp: str):
    """The autocast context of an AMP mode (a no-op for ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 (float16 gradients underflow without one); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure: torch's OutOfMemoryError, or the RuntimeError a CUDA library raises when its
    own allocation fails (cuBLAS/cuDNN "ALLOC_FAILED", "CUDA error: out of memory")."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of CUDA calls)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
