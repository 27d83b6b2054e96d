"""Multi-head self-attention with a padding mask and a choice of kernels."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "ATTENTION_BACKENDS", "check_backend"]

# sdpa: torch's fused kernels (FlashAttention / cuDNN / memory-efficient on GPU);
# math: the explicit softmax(QK^T)V, kept as the reference the fused paths are tested against;
# xformers: xformers.ops.memory_efficient_attention (optional package).
ATTENTION_BACKENDS = ("sdpa", "math", "xformers")


def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError("model.attn_backend=xformers needs the xformers package (pip install anymodal[xformers], CUDA only); "
                          "use attn_backend=sdpa instead")


class Attention(nn.Module):
    """Self-attention over ``x [B, N, D]``; ``keep [B, N]`` (True = real token) masks keys.

    Parameter names follow timm's ``Attention`` (``qkv``, ``proj``) so ViT weights load directly.

    Args:
        dim: embedding width.
        num_heads: number of heads; ``dim`` must divide evenly.
        qkv_bias: bias on the fused qkv projection.
        backend: one of ``ATTENTION_BACKENDS``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        check_backend(backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.backend == "xformers":
            out = self._xformers(qkv, keep)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
            mask = None if keep is None else keep[:, None, None, :]
            if self.backend == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if mask is not None:
                    attn = attn.masked_fill(~mask, float("-inf"))
                out = attn.softmax(dim=-1) @ v
            out = out.transpose(1, 2)
        return self.proj(out.reshape(b, n, d))

    def _xformers(self, qkv: Tensor, keep: Optional[Tensor]) -> Tensor:
        import xformers.ops as xops

        q, k, v = qkv.unbind(2)  # each [B, N, H, hd]
        bias = None
        if keep is not None:
            # additive bias, broadcast over heads and queries; xformers wants it materialized
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
            bias = bias[:, None, None, :].expand(-1, self.num_heads, q.shape[1], -1)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
