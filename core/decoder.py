"""The decoder every masked-prediction objective shares: context tokens plus one mask token per
query position in, predictions at the queries out."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .layers import Block

__all__ = ["MaskTokenDecoder"]


class MaskTokenDecoder(nn.Module):
    """A narrow transformer that predicts features at query positions from context tokens.

    Context features are projected to ``width`` and get the positional encoding of their positions;
    one learned mask token plus the positional encoding of each query position is appended per
    query; after the blocks and a norm, the query slots are projected to ``out_dim``. The mask
    tokens carry no information beyond their positions, so the prediction at a query comes from the
    context alone. Used by `MaskedPixel` (MAE decoder), `Jepa` (predictor) and `MaskedDistill` (token-wise decoder).

    Args:
        in_dim: width of the context features.
        out_dim: width of the predictions.
        width: the predictor's width.
        depth: number of blocks.
        num_heads: attention heads.
        posenc: module mapping positions ``[B, M, k]`` to ``[B, M, width]``.
        mlp_ratio: MLP hidden width over ``width``.
        attn_backend: attention kernel of the blocks.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int,
        depth: int,
        num_heads: int,
        posenc: nn.Module,
        mlp_ratio: float = 4.0,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.posenc = posenc
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, attn_backend=attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # I-JEPA's predictor init: truncated normal (std 0.02) weights, zero biases
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, context: Tensor, context_pos: Tensor, target_pos: Tensor, prefix: Optional[Tensor] = None) -> Tensor:
        """Predict features at ``target_pos``.

        Args:
            context: context features ``[B, Nc, in_dim]``; ``context[:, i]`` sits at ``context_pos[:, i]``.
            context_pos: positions of the context slots ``[B, Nc, k]``.
            target_pos: positions to predict ``[B, Nt, k]``.
            prefix: optional position-free tokens ``[B, P, in_dim]`` (a class token) joining the context.

        Returns:
            predictions ``[B, Nt, out_dim]``, one per target position, in ``target_pos`` order.
        """
        x = self.embed(context)
        x = x + self.posenc(context_pos).to(x.dtype)
        queries = self.mask_token.to(x.dtype) + self.posenc(target_pos).to(x.dtype)
        parts = [x, queries.expand(x.shape[0], -1, -1)]
        if prefix is not None:
            parts.insert(0, self.embed(prefix))
        x = torch.cat(parts, dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -target_pos.shape[1]:]))
