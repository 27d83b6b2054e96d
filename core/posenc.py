"""Positional encodings made from `Tokens.pos`, so they follow tokens through gathers."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SinCosPosEnc", "LearnedPosEnc", "MlpPosEnc", "build_posenc", "sincos_1d", "POSENCS"]

POSENCS = ("sincos", "learned", "mlp")  # the kinds build_posenc makes


def sincos_1d(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sine-cosine encoding of positions ``[...]`` -> ``[..., dim]`` (dim even)."""
    half = dim // 2
    omega = torch.arange(half, device=pos.device, dtype=torch.float32) / half
    omega = 1.0 / temperature ** omega
    angles = pos.float().unsqueeze(-1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SinCosPosEnc(nn.Module):
    """Fixed sin-cos encoding of k-D grid coordinates: each axis gets an even share of the width,
    and any remainder stays zero. Works for 1-D (frames), 2-D (patches) and 3-D (tubelets) grids."""

    def __init__(self, dim: int, num_axes: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_axes = num_axes
        self.axis_dim = (dim // num_axes) // 2 * 2
        if self.axis_dim == 0:
            raise ValueError(f"width {dim} is too small for a sin-cos encoding of {num_axes} axes")

    def forward(self, pos: Tensor) -> Tensor:
        if pos.shape[-1] != self.num_axes:
            raise ValueError(f"sin-cos encoding built for {self.num_axes} axes got positions with {pos.shape[-1]}")
        parts = [sincos_1d(pos[..., i], self.axis_dim) for i in range(self.num_axes)]
        out = torch.cat(parts, dim=-1)
        if out.shape[-1] < self.dim:
            out = nn.functional.pad(out, (0, self.dim - out.shape[-1]))
        return out


class LearnedPosEnc(nn.Module):
    """A learned table over a fixed grid, indexed by the tokens' grid coordinates."""

    def __init__(self, dim: int, grid_size: Sequence[int]) -> None:
        super().__init__()
        self.grid_size = tuple(int(g) for g in grid_size)
        self.table = nn.Parameter(torch.zeros(math.prod(self.grid_size), dim))
        nn.init.trunc_normal_(self.table, std=0.02)
        strides = [math.prod(self.grid_size[i + 1:]) for i in range(len(self.grid_size))]
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.long), persistent=False)

    def forward(self, pos: Tensor) -> Tensor:
        # embedding rather than indexing: same rows, and its backward is a fast dense sum (indexing's
        # accumulate-scatter took 1 ms of a 175 ms ViT-Tiny CPU step)
        return F.embedding((pos.long() * self.strides).sum(-1), self.table)


class MlpPosEnc(nn.Module):
    """An MLP from continuous coordinates (for example xyz of point groups) to the width."""

    def __init__(self, dim: int, num_axes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_axes, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, pos: Tensor) -> Tensor:
        return self.net(pos.to(self.net[0].weight.dtype))


def build_posenc(kind: str, dim: int, num_axes: int, grid_size: Optional[Sequence[int]] = None) -> nn.Module:
    """Build a positional encoding by name: ``sincos``, ``learned`` or ``mlp``."""
    if kind == "sincos":
        return SinCosPosEnc(dim, num_axes)
    if kind == "learned":
        if grid_size is None:
            raise ValueError("posenc=learned needs a tokenizer with a fixed grid_size; use sincos or mlp for this tokenizer")
        return LearnedPosEnc(dim, grid_size)
    if kind == "mlp":
        return MlpPosEnc(dim, num_axes)
    raise ValueError(f"unknown positional encoding {kind!r}; choose {', '.join(POSENCS[:-1])} or {POSENCS[-1]}")
