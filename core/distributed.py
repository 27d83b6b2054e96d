"""Small torch.distributed helpers that also work, as the identity, in a single process.

Objectives call these instead of ``torch.distributed`` directly so the same code runs under
torchrun, Slurm and a plain ``python`` process (tests, notebooks) without branching.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "all_gather_with_grad"]


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

    return torch.cat(all_gather(x.contiguous()), dim=0)
