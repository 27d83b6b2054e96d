"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .optimizers import LAMB, LARS

__all__ = ["lr_at", "build_optimizer", "decay_exempt"]

_NO_DECAY = {"cls_token", "cls_pos", "mask_token", "table"}


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_exempt(name: str, p: Tensor) -> bool:
    """Biases, norms, learned tokens and position tables take no weight decay."""
    return p.ndim < 2 or name.rsplit(".", 1)[-1] in _NO_DECAY


def build_optimizer(module: nn.Module, optim: Any, device: torch.device) -> torch.optim.Optimizer:
    """``optim.name`` (AdamW, LARS or LAMB) without weight decay on biases, norms, learned tokens and
    position tables; LARS and LAMB leave those out of the trust-ratio scaling too."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if decay_exempt(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = str(optim.get("name", "adamw"))
    if kind == "lars":
        groups[1]["adapt"] = False
        return LARS(groups, lr=optim.lr, momentum=optim.betas[0], trust_coefficient=optim.trust_coefficient)
    if kind == "lamb":
        groups[1]["adapt"] = False
        return LAMB(groups, lr=optim.lr, betas=tuple(optim.betas))
    fused = str(optim.fused).lower()
    use_fused = device.type == "cuda" if fused == "auto" else fused == "true"
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=use_fused or None)
