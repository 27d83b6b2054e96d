"""Multi-head self-attention with a padding mask and a choice of kernels.

A ragged batch can also run packed: its real tokens side by side in one sequence ``[1, T, D]``
(`Packed`), attention restricted to each sample's own block. Nothing is then spent on padding,
in attention or in the MLPs; with xformers the kernel takes the block structure directly.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

__all__ = ["Attention", "ATTENTION_BACKENDS", "Packed", "check_backend"]

# sdpa: torch's fused kernels (FlashAttention / cuDNN / memory-efficient on GPU);
# math: the explicit softmax(QK^T)V, kept as the reference the fused paths are tested against;
# xformers: xformers.ops.memory_efficient_attention (optional package).
ATTENTION_BACKENDS = ("sdpa", "math", "xformers")


def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise BackendUnavailable("model.attn_backend=xformers needs the xformers package (pip install xformers, "
                                     "CUDA only); use attn_backend=sdpa instead")
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # e.g. built for another torch: say so now, not at the first forward
            raise BackendUnavailable(f"model.attn_backend=xformers: xformers is installed but does not import ({err}); "
                                     "use attn_backend=sdpa instead") from err


class BackendUnavailable(UserError, ImportError):
    """The attention backend the config asks for cannot run here (its package is missing or broken)."""


@dataclass
class Packed:
    """Where the real tokens of a padded batch ``[B, N]`` sit once packed into one sequence.

    Attributes:
        index: ``[T]`` flat positions (in ``B * N``) of the real tokens, sample by sample.
        seqlens: real tokens per sample.
        shape: ``(B, N)`` of the padded batch.
    """

    index: Tensor
    seqlens: list[int]
    shape: tuple[int, int]
    _xformers_bias: Any = field(default=None, repr=False)
    _block_mask: Optional[Tensor] = field(default=None, repr=False)

    @classmethod
    def from_keep(cls, keep: Tensor) -> "Packed":
        """From ``keep [B, N]`` (True = real token)."""
        return cls(keep.flatten().nonzero().squeeze(1), keep.sum(1).tolist(), tuple(keep.shape))

    def pack(self, x: Tensor) -> Tensor:
        """``[B, N, ...]`` -> ``[1, T, ...]``, real tokens only."""
        return x.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: Tensor) -> Tensor:
        """``[1, T, ...]`` -> ``[B, N, ...]``, zeros at padding."""
        b, n = self.shape
        out = x.new_zeros((b * n,) + x.shape[2:]).index_copy(0, self.index, x[0])
        return out.view((b, n) + x.shape[2:])

    def block_mask(self, device: torch.device) -> Tensor:
        """``[T, T]`` True where query and key are in the same sample: the explicit, O(T^2) form."""
        if self._block_mask is None:  # built once, shared by every block
            sample = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device),
                                             torch.tensor(self.seqlens, device=device))
            self._block_mask = sample[:, None] == sample[None, :]
        return self._block_mask

    def xformers_bias(self, device: torch.device) -> Any:
        if self._xformers_bias is None:  # built once, shared by every block
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            self._xformers_bias = BlockDiagonalMask.from_seqlens(self.seqlens, device=device)
        return self._xformers_bias


# what masks keys: a [B, N] bool tensor (True = real token), a packed layout, or nothing
KeyMask = Union[Tensor, Packed, None]


class Attention(nn.Module):
    """Self-attention over ``x [B, N, D]``; ``keep [B, N]`` (True = real token) masks keys.

    With ``keep`` a `Packed` layout, ``x`` is the packed ``[1, T, D]`` and each token attends
    within its own sample only: through xformers' block-diagonal kernel with ``xformers``, through
    an explicit ``[T, T]`` mask otherwise (the reference the kernel is checked against).

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

    def forward(self, x: Tensor, keep: KeyMask = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.backend == "xformers":
            out = self._xformers(qkv, keep)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
            if isinstance(keep, Packed):
                mask = keep.block_mask(x.device)
            else:
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

    def _xformers(self, qkv: Tensor, keep: KeyMask) -> Tensor:
        import xformers.ops as xops

        q, k, v = qkv.unbind(2)  # each [B, N, H, hd]
        bias = None
        if isinstance(keep, Packed):
            bias = keep.xformers_bias(q.device)
        elif keep is not None:
            # additive bias, broadcast over heads and queries; xformers wants it materialized
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
            bias = bias[:, None, None, :].expand(-1, self.num_heads, q.shape[1], -1)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
