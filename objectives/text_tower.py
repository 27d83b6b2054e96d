"""The text tower of contrastive objectives: a text tokenizer in front of the shared `Encoder` class.

It is built from the same core pieces as the student (tokens, sin-cos positions, pre-norm blocks),
only smaller and with its own weights; it lives inside the objective, so it is trained with it and
saved with the objective's state, but it is not part of the exported backbone. Its tokenizer is a
registered one (``byte_text``, ``clip_bpe`` or a plugin's), built by ``core.build`` from the
objective's ``text.tokenizer`` node and handed in built.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..core.encoder import Encoder
from ..core.posenc import build_posenc

__all__ = ["TextEncoder"]


class TextEncoder(nn.Module):
    """Texts -> one vector each, the mean of the encoded real tokens (padding excluded).

    Mean pooling rather than CLIP's end-token feature: the encoder attends both ways (no causal
    mask), so no single position summarizes the text better than the average, and the mean does
    not depend on where truncation put the end token.

    Args:
        tokenizer: a text tokenizer (``forward(list of strings) -> Tokens`` with 1-D positions and
            ``dim`` / ``input_key`` attributes), for example ``byte_text`` (UTF-8 bytes, no files
            needed) or ``clip_bpe`` (CLIP's BPE vocabulary); its ``max_len`` bounds the texts.
        dim: width; default the tokenizer's, which it must equal.
        depth: transformer blocks.
        num_heads: attention heads.
        attn_backend: attention kernel (see ``core.attention``).

    Raises:
        ValueError: ``dim`` differs from the tokenizer's width.
    """

    def __init__(self, tokenizer: nn.Module, dim: Optional[int] = None, depth: int = 2, num_heads: int = 4,
                 attn_backend: str = "sdpa") -> None:
        super().__init__()
        if dim is not None and dim != tokenizer.dim:
            raise ValueError(f"text.dim is {dim} but its tokenizer makes tokens of width {tokenizer.dim}; "
                             "leave the tokenizer's dim unset (it gets text.dim) or set the two alike")
        self.tokenizer = tokenizer
        self.dim = tokenizer.dim
        self.input_key = self.tokenizer.input_key
        self.encoder = Encoder(self.dim, depth, num_heads, build_posenc("sincos", self.dim, 1), attn_backend=attn_backend,
                               cls_token=False)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """``texts`` (B strings) -> ``[B, dim]``."""
        return self.encoder(self.tokenizer(texts)).pool("mean")
