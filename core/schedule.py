"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["lr_at", "build_optimizer"]

_NO_DECAY = {"cls_token", "cls_pos", "mask_token", "table"}


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, optim: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, learned tokens and position tables."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            exempt = p.ndim < 2 or name.rsplit(".", 1)[-1] in _NO_DECAY
            (no_decay if exempt else decay).append(p)
    fused = str(optim.fused).lower()
    use_fused = device.type == "cuda" if fused == "auto" else fused == "true"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=tuple(optim.betas), fused=use_fused or None,
    )
