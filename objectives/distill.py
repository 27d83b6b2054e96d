"""Distillation from a frozen teacher into a masked student.

`UnmaskedTokenDistill`: Li et al., 2023, "Unmasked Teacher: Towards Training-Efficient Video
Foundation Models" (UMT; reference code github.com/OpenGVLab/unmasked_teacher). The student sees a
heavily masked input; its visible tokens, through a linear projection, are aligned with the
teacher's features of the same tokens (optionally at each of the last k blocks).

`MaskedDistill`: Zhao et al., 2024, "VideoPrism: A Foundational Visual Encoder for Video
Understanding", stage 2. The student encodes a masked input; one decoder predicts the teacher's
global embedding, another the teacher's features of the masked tokens, with the visible features
shuffled across the visible slots before positions are added so that the decoder cannot lean on
the encoder's positional information.

Both compare features with the normalized MSE, `normalized_mse`: the squared distance between
L2-normalized vectors, which equals ``2 - 2 cos(pred, target)`` per token; it ignores the
teacher's feature scale.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.decoder import MaskTokenDecoder
from ..core.layers import Block
from ..core.masking import Mask
from ..core.objective import Batch, ObjectiveOutput
from ..core.posenc import build_posenc
from ..core.teachers import teacher_encode
from ..core.tokens import gather_tokens

__all__ = ["UnmaskedTokenDistill", "MaskedDistill", "GlobalDecoder", "normalized_mse", "arrange_visible"]


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over vectors of ``|| pred/|pred| - target/|target| ||^2 = 2 - 2 cos`` (range [0, 4]).

    Args:
        pred: ``[..., D]``.
        target: ``[..., D]``, same shape.
    """
    diff = F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)
    return diff.pow(2).sum(-1).mean()


def arrange_visible(features: Tensor, generator: torch.Generator, shuffle: bool = True) -> tuple[Tensor, Tensor]:
    """Put each visible feature into a visible slot.

    With ``shuffle``, a uniformly random cyclic permutation per sample (drawn from ``generator``)
    moves every feature to another slot (for two or more slots); without, every feature stays in its
    own slot. Slots keep their positions, so a shuffled feature is decoded at another token's position.

    Args:
        features: ``[B, Nv, D]``, in the order of ``batch.mask.visible``.
        generator: the step's generator.
        shuffle: permute, or keep the identity.

    Returns:
        ``(arranged [B, Nv, D], perm [B, Nv])`` with ``arranged[b, i] = features[b, perm[b, i]]``.
    """
    b, n = features.shape[:2]
    if not shuffle or n < 2:
        perm = torch.arange(n, device=features.device).expand(b, n)
        return features, perm
    # a random order sigma; slot sigma[i] receives the feature of sigma[i + 1]: one n-cycle, no fixed point
    sigma = torch.rand(b, n, generator=generator, device=generator.device).argsort(dim=1).to(features.device)
    perm = torch.empty_like(sigma).scatter_(1, sigma, sigma.roll(-1, dims=1))
    return gather_tokens(features, perm), perm


def _require(batch: Batch, teacher: Any, name: str) -> Mask:
    if batch.mask is None:
        raise ValueError(f"{name} needs a masker in its stage (stage.masker: random, tube, ...)")
    if teacher is None:
        raise ValueError(f"{name} needs a frozen teacher: set the stage's `teacher:` (stage, timm, ema)")
    return batch.mask


class UnmaskedTokenDistill(nn.Module):
    """UMT: align the student's visible tokens with a frozen teacher's features of the same tokens.

    With ``layers == 1`` the final (normed) features of both are aligned; with ``layers = k > 1``
    each of the student's last k block outputs is aligned with the teacher's corresponding one
    (``Encoded.layers``, oldest first), each through its own projection, and the k losses averaged.

    Args:
        dim: student width.
        tokenizer: the student's tokenizer (unused; part of the objective factory contract).
        teacher_dim: the teacher's feature width; None means ``dim``.
        layers: how many final blocks to align (1: the final features).

    Raises:
        ValueError: ``layers < 1``.
    """

    needs_mask = True
    needs_teacher = True

    def __init__(self, dim: int, tokenizer: Any = None, teacher_dim: Optional[int] = None, layers: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"umt distill layers must be at least 1, got {layers}")
        self.layers = int(layers)
        self.teacher_dim = dim if teacher_dim is None else int(teacher_dim)
        self.proj = nn.ModuleList(nn.Linear(dim, self.teacher_dim) for _ in range(self.layers))

    def features(self, batch: Batch, student: Any, teacher: Any) -> tuple[list[Tensor], list[Tensor]]:
        """Projected student features and teacher targets at the visible tokens, one pair per aligned layer.

        Returns:
            ``(preds, targets)``: two lists of ``layers`` tensors ``[B, Nv, teacher_dim]``.

        Raises:
            ValueError: no mask or teacher, or the teacher gives fewer layers or another width.
        """
        mask = _require(batch, teacher, "umt distill")
        if self.layers == 1:
            student_feats = [student.encode(batch.tokens, mask.visible).tokens.x]
            teacher_feats = [teacher_encode(batch, teacher).tokens.x]
        else:
            student_feats = student.encode(batch.tokens, mask.visible, layers=self.layers).layers
            teacher_feats = teacher_encode(batch, teacher, layers=self.layers).layers
            if len(teacher_feats) != self.layers or len(student_feats) != self.layers:
                raise ValueError(f"umt distill aligns the last {self.layers} blocks, but the student gives "
                                 f"{len(student_feats)} and the teacher {len(teacher_feats)}: lower `layers`")
        preds, targets = [], []
        for proj, s, t in zip(self.proj, student_feats, teacher_feats):
            if t.shape[-1] != self.teacher_dim:
                raise ValueError(f"umt distill projects to {self.teacher_dim} but the teacher gives {t.shape[-1]}-wide "
                                 f"features: set the objective's teacher_dim to {t.shape[-1]}")
            preds.append(proj(s))
            targets.append(gather_tokens(t, mask.visible))
        return preds, targets

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        """Mean normalized MSE over the aligned layers and visible tokens.

        Raises:
            ValueError: the batch has no mask or there is no teacher.
        """
        preds, targets = self.features(batch, student, teacher)
        per_layer = [normalized_mse(p, t) for p, t in zip(preds, targets)]
        loss = torch.stack(per_layer).mean()
        metrics = {"loss": loss.detach().item()}
        if self.layers > 1:
            metrics.update({f"layer{i}": v.detach().item() for i, v in enumerate(per_layer)})
        return ObjectiveOutput(loss, metrics)


class GlobalDecoder(nn.Module):
    """Blocks over a token set without positions, mean-pooled, then a linear head: ``[B, M, in] -> [B, out]``.

    Args:
        in_dim: width of the input features.
        out_dim: width of the pooled prediction.
        width: the decoder's width.
        depth: number of blocks.
        num_heads: attention heads.
        attn_backend: attention kernel of the blocks.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, num_heads: int, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(Block(width, num_heads, attn_backend=attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class MaskedDistill(nn.Module):
    """VideoPrism stage 2: global and token-wise distillation into a masked student.

    The student encodes ``batch.mask.visible``. The global decoder (no positional encoding) pools
    the visible features into a prediction of the teacher's mean-pooled embedding of the full input.
    The token decoder takes the visible features, rearranged among the visible slots by
    `arrange_visible` (shuffled when ``shuffle``), adds the positional encoding of each *slot's*
    position (the position follows the slot, not the feature), appends mask tokens at the target
    positions and predicts the teacher's features at ``batch.mask.target``. The class token, when
    the encoder has one, joins the token decoder's context without a position.

    Args:
        dim: student width.
        tokenizer: the student's tokenizer; gives ``pos_axes`` and ``grid_size``.
        teacher_dim: the teacher's feature width; None means ``dim``.
        decoder_dim: width of both decoders.
        decoder_depth: blocks of both decoders.
        decoder_heads: attention heads of both decoders.
        posenc: the token decoder's positional encoding (``sincos``, ``learned``, ``mlp``).
        shuffle: shuffle the visible features across the visible slots (VideoPrism's anti-shortcut).
        global_weight: weight of the global term.
        token_weight: weight of the token-wise term.
        attn_backend: attention kernel of the decoders.
    """

    needs_mask = True
    needs_teacher = True
    arrange_visible = staticmethod(arrange_visible)

    def __init__(
        self,
        dim: int,
        tokenizer: nn.Module,
        teacher_dim: Optional[int] = None,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        posenc: str = "sincos",
        shuffle: bool = True,
        global_weight: float = 1.0,
        token_weight: float = 1.0,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.teacher_dim = dim if teacher_dim is None else int(teacher_dim)
        self.shuffle = shuffle
        self.global_weight, self.token_weight = float(global_weight), float(token_weight)
        self.global_decoder = GlobalDecoder(dim, self.teacher_dim, decoder_dim, decoder_depth, decoder_heads, attn_backend)
        pe = build_posenc(posenc, decoder_dim, tokenizer.pos_axes, getattr(tokenizer, "grid_size", None))
        self.token_decoder = MaskTokenDecoder(dim, self.teacher_dim, decoder_dim, decoder_depth, decoder_heads, pe,
                                             attn_backend=attn_backend)

    def predict(self, batch: Batch, student: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Run the student and both decoders.

        Returns:
            ``(global_pred [B, teacher_dim], token_pred [B, Nt, teacher_dim], perm [B, Nv])``; ``perm``
            as in `arrange_visible` (which visible feature sits in which visible slot).
        """
        mask = batch.mask
        if mask is None:
            raise ValueError("masked distill needs a masker in its stage (stage.masker: random, tube, ...)")
        encoded = student.encode(batch.tokens, mask.visible)
        feats = encoded.tokens.x
        global_pred = self.global_decoder(feats)
        arranged, perm = arrange_visible(feats, batch.generator, self.shuffle)
        target_pos = gather_tokens(batch.tokens.pos, mask.target)
        prefix = None if encoded.cls is None else encoded.cls.unsqueeze(1)
        token_pred = self.token_decoder(arranged, encoded.tokens.pos, target_pos, prefix)
        return global_pred, token_pred, perm

    def targets(self, batch: Batch, teacher: Any) -> tuple[Tensor, Tensor]:
        """``(global [B, teacher_dim], tokens [B, Nt, teacher_dim])``: the teacher's mean-pooled
        embedding of the full input and its features at ``batch.mask.target``."""
        mask = _require(batch, teacher, "masked distill")
        encoded = teacher_encode(batch, teacher)
        if encoded.tokens.x.shape[-1] != self.teacher_dim:
            raise ValueError(f"masked distill predicts {self.teacher_dim}-wide features but the teacher gives "
                             f"{encoded.tokens.x.shape[-1]}: set the objective's teacher_dim to {encoded.tokens.x.shape[-1]}")
        return encoded.pool("mean"), gather_tokens(encoded.tokens.x, mask.target)

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        """``global_weight * global + token_weight * token``, both normalized MSE.

        Raises:
            ValueError: the batch has no mask or there is no teacher.
        """
        global_target, token_target = self.targets(batch, teacher)
        global_pred, token_pred, _ = self.predict(batch, student)
        global_loss = normalized_mse(global_pred, global_target)
        token_loss = normalized_mse(token_pred, token_target)
        loss = self.global_weight * global_loss + self.token_weight * token_loss
        return ObjectiveOutput(loss, {"loss": loss.detach().item(), "global": global_loss.detach().item(),
                                      "token": token_loss.detach().item()})
