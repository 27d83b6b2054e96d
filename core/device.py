"""Device and precision choice from the config."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

__all__ = ["resolve_device", "autocast_for"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but torch sees no CUDA device (torch {torch.__version__})")
    return device


def autocast_for(device: torch.device, precision: str) -> tuple[Any, Optional[torch.dtype]]:
    """(context manager factory, dtype) for ``run.precision``."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"run.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    dtype = dtypes[precision]
    if dtype is None:
        return contextlib.nullcontext, None
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype
