"""Pieces every grid tokenizer shares: grid positions and per-token target normalization."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["grid_positions", "normalize_per_token", "targets_for_viewing", "any_true"]

_EPS = 1e-6


def any_true(mask: Tensor) -> bool:
    """Whether ``mask`` holds a True, for skipping work when it does not. While a graph is exported
    (``torch.export``, ONNX) the answer is always yes: the graph must serve every input, and it
    cannot branch on a tensor's values."""
    return torch.compiler.is_exporting() or bool(mask.any())


def grid_positions(grid: Sequence[int], batch: int, device: torch.device) -> Tensor:
    """Integer coordinates of every cell of ``grid`` in row-major order: ``[batch, prod(grid), len(grid)]``."""
    coords = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    return torch.stack([c.flatten() for c in coords], dim=-1).expand(batch, -1, -1)


def normalize_per_token(t: Tensor) -> Tensor:
    """Zero mean, unit variance over each token's values (MAE's ``norm_pix_loss`` targets)."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + _EPS).sqrt()


def targets_for_viewing(targets: Tensor, true: Tensor, keep: Tensor, normalized: bool) -> Tensor:
    """Undo `normalize_per_token` with the true tokens' statistics; tokens not kept become grey."""
    if normalized:
        targets = targets * (true.var(-1, keepdim=True, unbiased=False) + _EPS).sqrt() + true.mean(-1, keepdim=True)
    return torch.where(keep.unsqueeze(-1), targets, torch.full_like(targets, 0.5))
