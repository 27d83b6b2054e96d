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
teacher's feature scale. `MaskedDistill` can instead regress data2vec's targets (Baevski et al.,
2022, "data2vec: A General Framework for Self-supervised Learning in Speech, Vision and
Language"): the average of the teacher's last k block outputs, each normalized first
(`teacher_targets`), with an MSE or smooth-L1 loss.
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

__all__ = ["UnmaskedTokenDistill", "MaskedDistill", "GlobalDecoder", "normalized_mse", "arrange_visible",
           "normalize_features", "teacher_targets", "TARGET_NORMS"]

TARGET_NORMS = ("none", "layer", "instance")
DISTILL_LOSSES = ("normalized_mse", "mse", "smooth_l1")


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over vectors of ``|| pred/|pred| - target/|target| ||^2 = 2 - 2 cos`` (range [0, 4]).

    Args:
        pred: ``[..., D]``.
        target: ``[..., D]``, same shape.
    """
    diff = F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)
    return diff.pow(2).sum(-1).mean()


def normalize_features(x: Tensor, norm: str, valid: Optional[Tensor] = None) -> Tensor:
    """Normalize teacher features ``[B, N, D]`` without affine parameters.

    ``layer``: each token over the feature axis. ``instance``: each feature of each sample over its
    real tokens (``valid [B, N]``; None means all), as ``F.instance_norm`` over the token axis
    (eps 1e-5, biased variance). ``none``: unchanged.

    Raises:
        ValueError: an unknown ``norm``.
    """
    if norm == "none":
        return x
    if norm == "layer":
        return F.layer_norm(x, (x.shape[-1],))
    if norm != "instance":
        raise ValueError(f"target norm must be one of {', '.join(TARGET_NORMS)}, got {norm!r}")
    w = torch.ones(x.shape[:2], device=x.device, dtype=x.dtype) if valid is None else valid.to(x.dtype)
    w = w.unsqueeze(-1)
    count = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / count
    var = ((x - mean).pow(2) * w).sum(1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + 1e-5)


def teacher_targets(batch: Batch, teacher: Any, layers: int = 0, norm: str = "none") -> Tensor:
    """The teacher's target features over all tokens, ``[B, N, D]`` float32.

    ``layers == 0``: its final (normed) features, then ``normalize_features(., norm)``.
    ``layers = k > 0``: data2vec's target, the mean of its last k block outputs (before the final
    norm), each normalized by ``norm`` first so that no block's scale dominates.

    Raises:
        ValueError: no teacher, or it gives fewer than ``layers`` block outputs.
    """
    encoded = teacher_encode(batch, teacher, layers=layers)
    valid = encoded.tokens.valid()
    if layers == 0:
        return normalize_features(encoded.tokens.x.float(), norm, valid)
    if len(encoded.layers) != layers:
        raise ValueError(f"the target averages the teacher's last {layers} blocks, but it gives "
                         f"{len(encoded.layers)}: lower target_layers")
    return torch.stack([normalize_features(h.float(), norm, valid) for h in encoded.layers]).mean(0)


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


def _regression_loss(kind: str, pred: Tensor, target: Tensor) -> Tensor:
    if kind == "normalized_mse":
        return normalized_mse(pred, target)
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float())
    return F.smooth_l1_loss(pred.float(), target.float())


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
        metrics = {"loss": loss.detach()}
        if self.layers > 1:
            metrics.update({f"layer{i}": v.detach() for i, v in enumerate(per_layer)})
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
        target_layers: the token targets: 0, the teacher's final features (VideoPrism); k > 0, the
            mean of its last k block outputs (data2vec, see `teacher_targets`). The global target
            is always the mean-pooled final features.
        target_norm: normalization of each token target layer (``none``, ``layer``, ``instance``);
            data2vec instance-normalizes each block output over the tokens.
        loss: token-wise loss, ``normalized_mse`` (VideoPrism; ignores scale), ``mse`` or
            ``smooth_l1`` (data2vec; both need normalized targets to mean anything).

    Raises:
        ValueError: ``target_layers < 0``, an unknown ``target_norm`` or ``loss``.
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
        target_layers: int = 0,
        target_norm: str = "none",
        loss: str = "normalized_mse",
    ) -> None:
        super().__init__()
        if target_layers < 0:
            raise ValueError(f"masked distill target_layers must be 0 (final features) or more, got {target_layers}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"masked distill target_norm must be one of {', '.join(TARGET_NORMS)}, got {target_norm!r}")
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"masked distill loss must be one of {', '.join(DISTILL_LOSSES)}, got {loss!r}")
        self.target_layers, self.target_norm, self.loss_kind = int(target_layers), target_norm, loss
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
        tokens = teacher_targets(batch, teacher, self.target_layers, self.target_norm)  # first: one teacher run
        encoded = teacher_encode(batch, teacher)
        if encoded.tokens.x.shape[-1] != self.teacher_dim:
            raise ValueError(f"masked distill predicts {self.teacher_dim}-wide features but the teacher gives "
                             f"{encoded.tokens.x.shape[-1]}: set the objective's teacher_dim to {encoded.tokens.x.shape[-1]}")
        return encoded.pool("mean"), gather_tokens(tokens, mask.target)

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        """``global_weight * global + token_weight * token``: normalized MSE, and ``loss`` for the tokens.

        Raises:
            ValueError: the batch has no mask or there is no teacher.
        """
        global_target, token_target = self.targets(batch, teacher)
        global_pred, token_pred, _ = self.predict(batch, student)
        global_loss = normalized_mse(global_pred, global_target)
        token_loss = _regression_loss(self.loss_kind, token_pred, token_target)
        loss = self.global_weight * global_loss + self.token_weight * token_loss
        return ObjectiveOutput(loss, {"loss": loss.detach(), "global": global_loss.detach(), "token": token_loss.detach()})
