"""The student: a tokenizer plugin in front of the shared encoder."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor, nn

from .encoder import Encoded, Encoder
from .tokens import Tokens

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Tokenizer + encoder; what pre-training trains and what is exported.

    Args:
        tokenizer: module mapping ``batch[tokenizer.input_key]`` to `Tokens`.
        encoder: the shared `Encoder`.
        pool: how `embed` pools tokens: ``mean`` or ``cls``.
    """

    def __init__(self, tokenizer: nn.Module, encoder: Encoder, pool: str = "mean") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.pool_mode = pool

    def tokenize(self, batch: Mapping[str, Any]) -> Tokens:
        key = self.tokenizer.input_key
        if key not in batch:
            raise KeyError(f"batch has no field {key!r} for the tokenizer; fields: {', '.join(sorted(batch))}")
        padding = batch.get(f"{key}_padding")  # ragged inputs (point clouds, waveforms): see core.data.collate
        return self.tokenizer(batch[key]) if padding is None else self.tokenizer(batch[key], padding=padding)

    def encode(self, tokens: Tokens, index: Optional[Tensor] = None, layers: int = 0,
               posenc: Optional[nn.Module] = None) -> Encoded:
        return self.encoder(tokens, index, layers, posenc)

    def pool(self, encoded: Encoded) -> Tensor:
        return encoded.pool(self.pool_mode)

    def embed(self, batch: Mapping[str, Any]) -> Tensor:
        """One pooled feature vector per sample ``[B, D]`` from all tokens (evaluation)."""
        return self.pool(self.encode(self.tokenize(batch)))
