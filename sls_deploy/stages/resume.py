"""What to do with the checkpoint an interrupted training run (search or finetune) left in work/."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sls_deploy.core import distributed as dist
from sls_deploy.core.errors import CheckpointError

Log = Callable[[str], None]


def check_resume(ckpt: Path, inputs: str, steps: int, resume: bool | None, log: Log, what: str = "finetune",
                 discard: bool = True) -> None:
    """What to do with a checkpoint an interrupted ``what`` left: keep it to resume (its run key matches),
    refuse (``resume`` False, or True and it does not match, or ``discard`` False and it does not match) or
    discard it (``resume`` None, no match)."""
    if not ckpt.exists():
        return
    if resume is False:
        raise CheckpointError(f"{ckpt} exists (an interrupted {what}); pass --resume to continue it "
                              "or --restart to discard it")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        matches = isinstance(state, dict) and state.get("run_key") == inputs
    except Exception:
        if resume or not discard:
            raise CheckpointError(f"cannot read {ckpt} (corrupt?); pass --restart to discard it") from None
        state, matches = None, False
    if matches:
        log(f"  resuming {what} from step {state['step']}/{steps}")
    elif resume or not discard:
        raise CheckpointError(f"{ckpt} belongs to other {what} settings (plan, weights, steps or data "
                              "changed); pass --restart to discard it")
    else:
        log(f"  discarding {ckpt.name}: it belongs to other {what} settings")
        dist.barrier()  # every rank has read it before rank 0 removes it
        if dist.is_main():
            ckpt.unlink()
        dist.barrier()
