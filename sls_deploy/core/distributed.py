"""Running under ``torchrun``: process group set-up and the few collective helpers the pipeline needs.

Every rank trains (DistributedDataParallel averages the weight gradients; controllers' own parameters, such as
SLS scores, are averaged here), so weights, gates and therefore plans stay identical on every rank. Only rank
0 writes files and runs export/validate. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


GROUP_TIMEOUT = timedelta(hours=4)


def init_from_env() -> bool:
    """Join the process group torchrun describes. True when distributed.

    On a machine with CUDA the group has both backends, "cpu:gloo,cuda:nccl": NCCL reduces the gradients of a
    model on the GPU (``--device cuda``: each rank on cuda:LOCAL_RANK, set by ``core.device``), gloo those of a
    model kept on the CPU (``--device cpu``), and the small object exchanges (sampler states, barriers) go through
    gloo. Without CUDA: gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # before NCCL's first use: one GPU per rank (core.device checks the rest)
        # rank 0 alone exports and validates while the others wait at shutdown's barrier: allow it hours
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def average_grads(params) -> None:
    """All-reduce (mean) the gradients of parameters that DDP does not own."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= dist.get_world_size()


def gather(obj) -> list:
    """Every rank's ``obj`` (on every rank)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown(wait: bool = True) -> None:
    """Leave the process group; ``wait`` (a command that ended normally): first wait for every rank. A rank that
    left while rank 0 was still exporting could take the job down (gloo aborted the finished process at exit,
    and torchrun then killed rank 0 mid-export). After an error nothing waits: the failing rank may be alone."""
    if active():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
