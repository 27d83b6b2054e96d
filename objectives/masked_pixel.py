"""Masked reconstruction in input space (MAE: He et al., 2022, "Masked Autoencoders Are Scalable
Vision Learners"; reference code github.com/facebookresearch/mae).

The encoder sees the visible tokens only; a light decoder takes their features plus a mask token
at every target position and predicts the tokenizer's per-token targets (normalized pixel
patches, spectrogram patches, ...). The loss is over the target tokens only.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.decoder import MaskTokenDecoder
from ..core.objective import Batch, ObjectiveOutput
from ..core.posenc import build_posenc
from ..core.tokens import gather_tokens

__all__ = ["MaskedPixel"]


class MaskedPixel(nn.Module):
    """MAE decoder and loss.

    Args:
        dim: encoder width.
        tokenizer: the student's tokenizer; gives ``target_dim``, ``pos_axes`` and ``grid_size``.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        posenc: decoder positional encoding (``sincos``, ``learned``, ``mlp``).
        loss: ``mse`` or ``l1``; a tokenizer with ``reconstruction_loss(pred, target)`` (point
            groups compared by Chamfer distance) supplies its own instead.
        attn_backend: attention kernel of the decoder blocks.
    """

    needs_mask = True
    needs_targets = True  # reads Tokens.targets

    def __init__(self, dim: int, tokenizer: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, posenc: str = "sincos", loss: str = "mse", attn_backend: str = "sdpa") -> None:
        super().__init__()
        if not hasattr(tokenizer, "target_dim"):
            raise ValueError(f"masked_pixel needs a tokenizer with reconstruction targets; {type(tokenizer).__name__} has no target_dim")
        if loss not in ("mse", "l1"):
            raise ValueError(f"masked_pixel loss must be mse or l1, got {loss!r}")
        self.loss_kind = loss
        pe = build_posenc(posenc, decoder_dim, tokenizer.pos_axes, getattr(tokenizer, "grid_size", None))
        self.decoder = MaskTokenDecoder(dim, tokenizer.target_dim, decoder_dim, decoder_depth, decoder_heads, pe,
                                        attn_backend=attn_backend)
        for m in self.decoder.modules():  # MAE's decoder init (xavier), faster to start than JEPA's std-0.02
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def reconstruct(self, batch: Batch, student: Any) -> Tensor:
        """Predicted targets at ``batch.mask.target``: ``[B, Nt, P]``."""
        encoded = student.encode(batch.tokens, batch.mask.visible)
        prefix = None if encoded.cls is None else encoded.cls.unsqueeze(1)
        target_pos = gather_tokens(batch.tokens.pos, batch.mask.target)
        return self.decoder(encoded.tokens.x, encoded.tokens.pos, target_pos, prefix)

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        if batch.mask is None:
            raise ValueError("masked_pixel needs a masker in its stage (stage.masker)")
        if batch.tokens.targets is None:
            raise ValueError(f"masked_pixel got no reconstruction targets from {type(student.tokenizer_of(batch.tokens.sensor or None)).__name__} "
                             "(its make_targets is off, or it makes none)")
        pred = self.reconstruct(batch, student).float()
        target = gather_tokens(batch.tokens.targets, batch.mask.target).float()
        own_loss = getattr(student.tokenizer_of(batch.tokens.sensor or None), "reconstruction_loss", None)
        if own_loss is not None:  # targets that are sets (point groups): the tokenizer's set distance
            loss = own_loss(pred, target)
        else:
            loss = F.mse_loss(pred, target) if self.loss_kind == "mse" else F.l1_loss(pred, target)
        return ObjectiveOutput(loss, {"recon": loss.detach()})
