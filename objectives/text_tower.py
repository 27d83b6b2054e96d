"""The text tower of contrastive objectives: a text tokenizer in front of the shared `Encoder` class.

It is built from the same core pieces as the student (tokens, sin-cos positions, pre-norm blocks),
only smaller and with its own weights; it lives inside the objective, so it is trained with it and
saved with the objective's state, but it is not part of the exported backbone.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..core.encoder import Encoder
from ..core.posenc import build_posenc
from ..tokenizers.text import ByteTextTokenizer, ClipBpeTokenizer

__all__ = ["TextEncoder", "TEXT_TOKENIZERS"]

TEXT_TOKENIZERS = ("byte", "clip_bpe")


class TextEncoder(nn.Module):
    """Texts -> one vector each, the mean of the encoded real tokens (padding excluded).

    Mean pooling rather than CLIP's end-token feature: the encoder attends both ways (no causal
    mask), so no single position summarizes the text better than the average, and the mean does
    not depend on where truncation put the end token.

    Args:
        dim: width.
        depth: transformer blocks.
        num_heads: attention heads.
        max_len: most tokens per text, start and end tokens included.
        tokenizer: ``byte`` (UTF-8 bytes, no files needed) or ``clip_bpe`` (CLIP's BPE vocabulary).
        vocab_path: the CLIP vocabulary file for ``clip_bpe`` (default: found in an installed package).
        attn_backend: attention kernel (see ``core.attention``).

    Raises:
        ValueError: an unknown tokenizer, or ``vocab_path`` with the byte tokenizer.
    """

    def __init__(self, dim: int = 128, depth: int = 2, num_heads: int = 4, max_len: int = 32, tokenizer: str = "byte",
                 vocab_path: Optional[str] = None, attn_backend: str = "sdpa") -> None:
        super().__init__()
        if tokenizer == "byte":
            if vocab_path is not None:
                raise ValueError("text.vocab_path is only used by tokenizer=clip_bpe; remove it or set tokenizer: clip_bpe")
            self.tokenizer = ByteTextTokenizer(dim, max_len)
        elif tokenizer == "clip_bpe":
            self.tokenizer = ClipBpeTokenizer(dim, max_len, vocab_path)
        else:
            raise ValueError(f"unknown text tokenizer {tokenizer!r}; choose one of {', '.join(TEXT_TOKENIZERS)}")
        self.dim = dim
        self.input_key = self.tokenizer.input_key
        self.encoder = Encoder(dim, depth, num_heads, build_posenc("sincos", dim, 1), attn_backend=attn_backend,
                               cls_token=False)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """``texts`` (B strings) -> ``[B, dim]``."""
        return self.encoder(self.tokenizer(texts)).pool("mean")
