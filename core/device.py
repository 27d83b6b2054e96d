"""Device and precision choice from the config."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .errors import UserError

__all__ = ["resolve_device", "autocast_for", "PRECISIONS", "sdpa_kernels", "SDPA_KERNELS", "compile_blocks", "compile_for", "COMPILE_MODES"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but torch sees no CUDA device (torch {torch.__version__}); "
                        f"use run.device=auto or cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # run.precision: auto is bf16 on GPUs that support it, else fp32


def autocast_for(device: torch.device, precision: str) -> tuple[Any, Optional[torch.dtype]]:
    """(context manager factory, dtype) for ``run.precision``."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"run.precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {precision!r}")
    dtype = dtypes[precision]
    if dtype is None:
        return contextlib.nullcontext, None
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


# run.sdpa_kernel: which fused kernels scaled_dot_product_attention may use. "auto" lets torch pick
# (FlashAttention, cuDNN or memory-efficient on GPUs); naming one pins it, to measure or to dodge a
# kernel bug. A padding mask rules FlashAttention out, so "flash" fails loudly on ragged batches.
SDPA_KERNELS = ("auto", "flash", "cudnn", "efficient", "math")


def sdpa_kernels(name: str) -> Any:
    """A context manager restricting SDPA to the kernel ``name`` (one of ``SDPA_KERNELS``)."""
    if name not in SDPA_KERNELS:
        raise ValueError(f"run.sdpa_kernel must be one of {', '.join(SDPA_KERNELS)}, got {name!r}")
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def compile_blocks(*modules: Optional[torch.nn.Module], **options: Any) -> int:
    """``torch.compile`` each transformer block inside ``modules`` in place; returns how many.

    Compiling block by block (regional compilation) costs one compile per distinct block shape
    rather than one per whole model, and keeps parameter names unchanged, so checkpoints written
    with and without compilation load into each other. ``options`` go to ``torch.compile``.
    """
    from .layers import Block

    count = 0
    for module in modules:
        for m in [] if module is None else module.modules():
            if isinstance(m, Block):
                m.compile(**options)
                count += 1
    return count


# run.compile: "blocks" compiles each transformer block (quick to compile, robust to any objective);
# "objectives" compiles each objective's whole forward (student encoding, decoder and loss in one
# graph: the faster step on GPUs, a longer first step).
COMPILE_MODES = ("none", "blocks", "objectives")


def compile_for(mode: str, model: torch.nn.Module, objectives: torch.nn.ModuleDict,
                teacher: Optional[torch.nn.Module], cuda_graphs: bool = False) -> None:
    """Apply ``run.compile`` in place; parameter names do not change.

    ``cuda_graphs`` (``run.cuda_graphs``) compiles with mode ``reduce-overhead``: each compiled
    part is captured once per input shape and replayed as a CUDA graph, which removes the per-kernel
    launch cost. Shapes must repeat: fixed-size inputs with a fixed mask ratio do (the maskers keep
    the same visible count for every sample); ragged batches would capture a graph per shape.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"run.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if cuda_graphs and mode == "none":
        raise ValueError("run.cuda_graphs=true replays compiled code: set run.compile=blocks or objectives too")
    options = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if mode == "blocks":
        compile_blocks(model, teacher, **options)
    elif mode == "objectives":
        for objective in objectives.values():
            objective.compile(**options)
