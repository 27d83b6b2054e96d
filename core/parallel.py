"""Data parallelism for a stage: DistributedDataParallel or FSDP2 (``fully_shard``), by ``run.parallel``.

With one process both are the identity. Under DDP (and in one process) rank 0 writes whole
weights and optimizer state keyed by parameter name (torch.distributed.checkpoint's state-dict
API). Under FSDP every rank writes its own shards with torch.distributed.checkpoint (no gather on
rank 0); the loader reshards, so such a checkpoint resumes on another number of ranks, under DDP
or in one process. A stage's final weights are always written whole (``<stage>-final.pt``), for
the next stage, export and eval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["PARALLEL_MODES", "parallelize", "full_optimizer_state", "load_optimizer_state",
           "grad_norm_value", "save_shards", "load_shards", "load_backbone_from_shards"]

PARALLEL_MODES = ("ddp", "fsdp")


def _state_dict_api() -> Any:
    """torch.distributed.checkpoint's state-dict module, imported when first needed: it takes about
    a second to import, which every command (eval, export, --help) would otherwise pay."""
    import torch.distributed.checkpoint.state_dict as api

    return api


def _shard_backbone_owner(module: nn.Module, backbone: nn.Module, **kwargs: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    encoders = [backbone.encoder, *(o.encoder for o in backbone.others.values() if o.encoder is not None)]
    for block in (b for encoder in encoders for b in encoder.blocks):  # one unit per block: gathered one at a time
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)  # the rest (tokenizer, norms, objectives' heads) in the root unit


def parallelize(mode: str, world: int, model: nn.Module, teacher: Optional[nn.Module]) -> nn.Module:
    """Prepare a stage's `StepForward` (and a moving teacher) for ``world`` ranks; returns what to call.

    ddp: one DDP wrapper; ``static_graph`` because the same parameters take part in every step
    (some, like an unused class token, in none), so DDP need not search the graph each step.
    fsdp: each encoder block and the rest of the model are sharded across ranks. An EMA teacher is
    sharded the same way, so its update pairs each teacher shard with the student's shard; it
    reshards after its forward since it never runs a backward. Frozen teachers stay whole.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"run.parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if world == 1:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, static_graph=True)
    _shard_backbone_owner(model, model.backbone)
    if hasattr(teacher, "update"):
        _shard_backbone_owner(teacher, teacher.backbone, reshard_after_forward=True)
    return model


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, full, on CPU (a collective under FSDP)."""
    api = _state_dict_api()
    return api.get_optimizer_state_dict(module, optimizer, options=api.StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `full_optimizer_state`'s output; every rank passes the full state and keeps its shard."""
    api = _state_dict_api()
    api.set_optimizer_state_dict(module, optimizer, state, options=api.StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (under FSDP it is a DTensor: take the full value)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module]) -> dict[str, Any]:
    api = _state_dict_api()
    state = {"model": api.get_model_state_dict(model), "optimizer": api.get_optimizer_state_dict(model, optimizer)}
    if hasattr(teacher, "update"):
        state["teacher"] = api.get_model_state_dict(teacher)
    return state


def save_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module]) -> None:
    """Every rank writes its shards of the model, optimizer and moving teacher into folder ``path``
    (a collective; the folder is complete once its ``.metadata`` exists, written last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer, teacher), checkpoint_id=str(path))


def _load(state: dict[str, Any], path: Path, partial: bool = False) -> None:
    """torch.distributed.checkpoint's load, with nothing from the folder unpickled unrestricted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .checkpoint import CheckpointError
    from .safe_shards import SafeLoadPlanner, SafeShardReader

    SafeShardReader(path).read_metadata()  # its own clear error for a crafted or torn folder, before DCP wraps it
    planner = SafeLoadPlanner(allow_partial_load=partial)
    try:
        dcp.load(state, storage_reader=SafeShardReader(path), planner=planner)
    except (Exception, CheckpointException) as e:  # DCP's (a BaseException) carries every rank's error
        if planner.refused is not None:
            raise planner.refused from e
        raise CheckpointError(f"sharded checkpoint {path} cannot be loaded into this model ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[-400:]})") from e


def load_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module]) -> None:
    """Load `save_shards`' folder into the (possibly differently) sharded model, optimizer and teacher."""
    state = _sharded_state(model, optimizer, teacher)
    _load(state, path)
    api = _state_dict_api()
    api.set_model_state_dict(model, state["model"])
    api.set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if "teacher" in state:
        api.set_model_state_dict(teacher, state["teacher"])


def load_backbone_from_shards(path: Path, backbone: nn.Module) -> None:
    """The backbone's weights alone from a `save_shards` folder, in one process (export)."""
    state = {"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    _load(state, path, partial=True)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state["model"].items()})
