"""Small torch.distributed helpers that also work, as the identity, in a single process.

Objectives call these instead of ``torch.distributed`` directly so the same code runs under
torchrun, Slurm and a plain ``python`` process (tests, notebooks) without branching.
"""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "init_from_env", "shutdown", "barrier",
           "all_gather_with_grad", "mean_over_ranks"]


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from torchrun or submitit); 0 when absent."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_type: str, timeout_s: float = 1800) -> bool:
    """Join the process group that the launcher describes in the environment, if there is one.

    torchrun and submitit (``TorchDistributedEnvironment().export()``) both set ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. With ``WORLD_SIZE`` 1 or unset this is a
    no-op, so one code path serves a laptop and a cluster. NCCL on GPUs, gloo on CPUs.
    Returns True when this call created the group (the caller then calls `shutdown`).
    """
    if is_distributed() or _env_world() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={_env_world()} but {', '.join(missing)} not set: launch with torchrun, "
                           "or `anymodal submit` on Slurm")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a file rank 0 wrote is then visible to all); no-op in one process."""
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(values: Sequence[Tensor | float], flag: Optional[float] = None) -> tuple[list[float], float]:
    """Average scalars over ranks in one collective, and OR a flag across them.

    Returns ``(means, flag_sum)``: ``flag_sum`` > 0 when any rank passed a non-zero flag (a
    preemption signal seen by one rank stops all of them at the same step). One host sync.
    """
    device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values]
                         + [torch.tensor(float(flag or 0), device=device)])
    if world_size() > 1:
        if device.type == "cpu" and dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed)
        packed[:-1] /= world_size()
    out = packed.tolist()
    return out[:-1], out[-1]


def is_distributed() -> bool:
    """True inside an initialized process group (``torch.distributed`` may be built without it)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x [b, ...]`` from every rank along dim 0, in rank order: ``[world * b, ...]``.

    Unlike ``dist.all_gather`` (which returns tensors cut off from autograd), the backward pass sends
    each rank's share of the gradient back to the rank that produced that slice and sums it there,
    so a loss that uses other ranks' samples as negatives also trains through them (CLIP's
    cross-rank negatives). Every rank must pass the same shape (a sampler with ``drop_last``).

    Outside a process group, or with one process, returns ``x`` itself.
    """
    if world_size() == 1:
        return x
    # imported here, not at the top: it needs a torch built with distributed support
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private API; it is still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)
