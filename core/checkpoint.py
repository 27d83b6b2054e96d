"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors, numbers and strings. It is written to a temporary file in
the same folder, flushed to disk and renamed over the old one, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .errors import UserError

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError", "StateMismatchError", "rng_state", "set_rng_state",
           "load_model_state", "checkpoint_part", "shard_folder", "read_weights_file"]

FORMAT = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another model."""


class StateMismatchError(CheckpointError, ValueError):
    """Weights whose keys or shapes do not fit the module they are loaded into."""


def save_atomic(state: Mapping[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a kill leaves the old file or the new one.

    Raises:
        CheckpointError: the disk is full (or the write failed); the partial file is removed and the
            message names the last good checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_error = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
        if os_error is None:
            raise
        # torch's zip writer reports a failed write as a RuntimeError whose context is the OSError
        reason = "no space left on device" if os_error.errno in (errno.ENOSPC, errno.EDQUOT) else str(os_error)
        good = path if path.is_file() else "none (this was the first)"
        raise CheckpointError(f"{reason} while writing {path}; the last good checkpoint is {good}") from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files; report them as one
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an anymodal checkpoint (format {state.get('format') if isinstance(state, dict) else '?'})")
    return state


def checkpoint_part(state: Mapping[str, Any], key: str, path: Path) -> Any:
    """``state[key]``, or a CheckpointError saying which checkpoint lacks it (a file of another kind)."""
    if key not in state:
        raise CheckpointError(f"checkpoint {path} has no {key!r} entry (it holds {', '.join(map(str, state)) or 'nothing'}): "
                              f"not a checkpoint of this kind")
    return state[key]


def shard_folder(path: Path, state: Mapping[str, Any]) -> Optional[Path]:
    """The shard folder a sharded (FSDP) checkpoint names, or None for a whole checkpoint.

    The name comes from the file, so it is confined: one plain ``shards-*`` entry of the
    checkpoint's own folder (no absolute path, no ``..``, no link out of it). Reading a folder
    anywhere would let a crafted checkpoint choose which files torch.distributed.checkpoint reads.
    """
    if "shards" not in state:
        return None
    path = Path(path)
    name = state["shards"]
    plain = isinstance(name, str) and name.startswith("shards-") and os.sep not in name and "/" not in name
    folder = path.parent / name if plain else None
    if folder is None or not folder.is_dir() or folder.resolve().parent != path.parent.resolve():
        raise CheckpointError(f"checkpoint {path} names shard folder {name!r}, which is not a shards-* folder beside it "
                              f"in {path.parent}: refusing to read it")
    return folder


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (tensors only), with a CheckpointError for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several types for torn or foreign files
        raise CheckpointError(f"weights file {path} cannot be read ({type(e).__name__}: {e})") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_model_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys of the model are missing (first: {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys are not in the model (first: {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
        raise StateMismatchError(f"{what}: the weights do not fit this model (another architecture or config): "
                                 + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
