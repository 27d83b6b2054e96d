"""Transformer building blocks: MLP, drop-path, the pre-norm block."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .attention import Attention, KeyMask

__all__ = ["Mlp", "DropPath", "Block"]


class Mlp(nn.Module):
    """Two linear layers with GELU between (timm's names: ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
        dim: embedding width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        drop_path: stochastic-depth probability of this block.
        attn_backend: attention kernel (see ``core.attention``).
        norm_layer: constructor of the normalization layer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_backend: str = "sdpa",
        norm_layer: Callable[[int], nn.Module] = lambda d: nn.LayerNorm(d, eps=1e-6),
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, backend=attn_backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, keep: KeyMask = None) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), keep))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
