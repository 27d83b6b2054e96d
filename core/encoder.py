"""The shared transformer encoder. It runs on whichever tokens it is given (visible ones only
during masked pre-training) and never sees mask tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Packed
from .layers import Block
from .tokens import Tokens

__all__ = ["Encoder", "Encoded", "ENCODER_SIZES", "POOLS"]

POOLS = ("mean", "cls")  # the modes of Encoded.pool

# width, depth, heads: timm's ViT names
ENCODER_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class Encoded:
    """Encoder output.

    Attributes:
        tokens: the encoded tokens; ``tokens.x [B, M, D]`` are features, other fields are the
            input's (positions, padding, targets) for the tokens that were encoded.
        cls: the class token's feature ``[B, D]``, or None.
        layers: when asked for, the outputs of the last k blocks (before the final norm), each
            ``[B, M, D]`` over the encoded tokens (no class token), oldest first.
    """

    tokens: Tokens
    cls: Optional[Tensor]
    layers: list[Tensor] = field(default_factory=list)

    def pool(self, mode: str = "mean") -> Tensor:
        """One vector per sample: ``cls`` or the ``mean`` over real tokens. ``[B, D]``."""
        if mode == "cls":
            if self.cls is None:
                raise ValueError("pool='cls' needs an encoder with cls_token=true")
            return self.cls
        if mode != "mean":
            raise ValueError(f"unknown pooling {mode!r}; choose {' or '.join(POOLS)}")
        keep = self.tokens.valid().unsqueeze(-1).to(self.tokens.x.dtype)
        return (self.tokens.x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class Encoder(nn.Module):
    """Pre-norm ViT encoder over `Tokens`.

    Args:
        dim: embedding width.
        depth: number of blocks.
        num_heads: attention heads.
        posenc: module mapping ``Tokens.pos`` to ``[B, N, dim]``.
        mlp_ratio: MLP hidden width over ``dim``.
        drop_path: stochastic depth at the last block (linearly increasing from 0).
        attn_backend: ``sdpa`` (default), ``math`` or ``xformers``.
        cls_token: prepend a learned class token.
        grad_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (less memory, about one more forward of compute).
        pack_ragged: run ragged batches packed (`core.attention.Packed`): real tokens only, each
            attending within its sample. On by default with ``xformers``, whose block-diagonal
            kernel makes it pay; the other backends then build an explicit ``[T, T]`` mask.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        posenc: nn.Module,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_backend: str = "sdpa",
        cls_token: bool = True,
        grad_checkpointing: bool = False,
        pack_ragged: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grad_checkpointing = grad_checkpointing
        self.pack_ragged = attn_backend == "xformers" if pack_ragged is None else pack_ragged
        self.posenc = posenc
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # no tensor: works on the meta device
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r, attn_backend) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tokens, index: Optional[Tensor] = None, layers: int = 0,
                posenc: Optional[nn.Module] = None) -> Encoded:
        """Encode ``tokens``, or only the tokens at ``index [B, M]`` (gathered, never masked in place).

        Args:
            tokens: the token sets.
            index: ``[B, M]`` indices of the tokens to encode; None encodes all.
            layers: also return the outputs of the last ``layers`` blocks (for layer-wise distillation).
            posenc: the positional encoding to use instead of the encoder's own, for tokens of
                another modality whose positions have other axes (a second sensor's tokenizer).
        """
        if index is not None:
            tokens = tokens.select(index)
        x = tokens.x + (self.posenc if posenc is None else posenc)(tokens.pos).to(tokens.x.dtype)
        keep = None if tokens.padding is None else ~tokens.padding
        if self.cls_token is not None:
            cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([cls, x], dim=1)
            if keep is not None:
                keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)
        prefix = 0 if self.cls_token is None else 1
        packed = Packed.from_keep(keep) if self.pack_ragged and keep is not None else None
        if packed is not None:
            x, keep = packed.pack(x), packed
        unpack = (lambda y: y) if packed is None else packed.unpack
        kept = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
            if i >= len(self.blocks) - layers:
                kept.append(unpack(x)[:, prefix:])
        x = unpack(self.norm(x))
        return Encoded(tokens.with_x(x[:, prefix:]), x[:, 0] if prefix else None, kept)
