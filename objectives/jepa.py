"""Joint-embedding predictive architecture: predict a target encoder's features of masked blocks
from the visible context, in latent space.

I-JEPA: Assran et al., 2023, "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture" (reference code github.com/facebookresearch/ijepa). V-JEPA: Bardes et
al., 2024, "Revisiting Feature Prediction for Learning Visual Representations from Video"
(github.com/facebookresearch/jepa). The two differ only in the masker (multiblock boxes that span
time on 3-D grids), which the stage chooses; this objective is the same for both.

The student (context encoder) encodes ``batch.mask.visible``. A narrow predictor maps the context
features to its own width, adds the positional encoding of their positions, appends a learned
mask token plus the positional encoding at every target position, runs a few blocks and maps the
outputs at the target slots back to the feature width. The teacher (the EMA target encoder) sees
the whole input; its features at ``batch.mask.target``, layer-normalized without affine
parameters (I-JEPA's ``F.layer_norm(h, (D,))``), are the targets. Gradients reach the student and
the predictor, never the teacher. Optionally the targets are data2vec's average of the teacher's
last k block outputs (`teacher_targets`), and a VICReg-style variance hinge (Bardes et al., 2022)
keeps the student's pooled features from collapsing.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.decoder import MaskTokenDecoder
from ..core.objective import Batch, ObjectiveOutput
from ..core.posenc import build_posenc
from ..core.tokens import gather_tokens
from .distill import TARGET_NORMS, teacher_targets

__all__ = ["Jepa", "variance_hinge"]

JEPA_LOSSES = ("smooth_l1", "l1")


class Jepa(nn.Module):
    """I-JEPA / V-JEPA predictor and latent-prediction loss.

    Args:
        dim: student (context encoder) width.
        tokenizer: the student's tokenizer; gives ``pos_axes`` and ``grid_size``.
        predictor_dim: predictor width (narrow: I-JEPA uses 384 for a ViT-H context encoder).
        predictor_depth: predictor blocks.
        predictor_heads: predictor attention heads.
        posenc: predictor positional encoding (``sincos``, ``learned``, ``mlp``).
        loss: ``smooth_l1`` (I-JEPA's reference code) or ``l1`` (V-JEPA).
        norm_targets: normalization of the teacher's features, without affine parameters: true or
            ``layer`` (each token over the feature axis, I-JEPA), ``instance`` (each feature over
            the tokens, data2vec), false or ``none``.
        teacher_dim: the teacher's feature width; the predictor's output width. None means ``dim``
            (an EMA teacher has the student's width).
        attn_backend: attention kernel of the predictor blocks.
        target_layers: 0: the targets are the teacher's final features; k > 0: the mean of its last
            k block outputs, each normalized by ``norm_targets`` first (data2vec).
        var_weight: weight of the variance hinge ``mean_d relu(1 - std_d)`` over the batch of the
            student's mean-pooled context features (0: off).

    Raises:
        ValueError: an unknown ``loss`` or ``norm_targets``, ``target_layers < 0`` or ``var_weight < 0``.
    """

    needs_mask = True
    needs_teacher = True

    def __init__(
        self,
        dim: int,
        tokenizer: nn.Module,
        predictor_dim: int = 96,
        predictor_depth: int = 2,
        predictor_heads: int = 3,
        posenc: str = "sincos",
        loss: str = "smooth_l1",
        norm_targets: Union[bool, str] = True,
        teacher_dim: Optional[int] = None,
        attn_backend: str = "sdpa",
        target_layers: int = 0,
        var_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in JEPA_LOSSES:
            raise ValueError(f"jepa loss must be one of {', '.join(JEPA_LOSSES)}, got {loss!r}")
        norm = {True: "layer", False: "none"}[norm_targets] if isinstance(norm_targets, bool) else norm_targets
        if norm not in TARGET_NORMS:
            raise ValueError(f"jepa norm_targets must be true, false or one of {', '.join(TARGET_NORMS)}, got {norm_targets!r}")
        if target_layers < 0:
            raise ValueError(f"jepa target_layers must be 0 (final features) or more, got {target_layers}")
        if var_weight < 0:
            raise ValueError(f"jepa var_weight must be at least 0, got {var_weight}")
        self.loss_kind = loss
        self.norm_targets = norm
        self.target_layers, self.var_weight = int(target_layers), float(var_weight)
        self.out_dim = dim if teacher_dim is None else int(teacher_dim)
        pe = build_posenc(posenc, predictor_dim, tokenizer.pos_axes, getattr(tokenizer, "grid_size", None))
        self.predictor = MaskTokenDecoder(dim, self.out_dim, predictor_dim, predictor_depth, predictor_heads, pe,
                                         attn_backend=attn_backend)

    def predict(self, batch: Batch, student: Any) -> Tensor:
        """The predictor's outputs at ``batch.mask.target``: ``[B, Nt, out_dim]``.

        The student encodes the visible tokens; their features (and the class token, when the
        encoder has one, as a position-free context token) feed the predictor, which is queried at
        exactly ``gather_tokens(batch.tokens.pos, batch.mask.target)``.
        """
        return self._predict(batch, student)[0]

    def _predict(self, batch: Batch, student: Any) -> tuple[Tensor, Any]:
        mask = _require_mask(batch)
        encoded = student.encode(batch.tokens, mask.visible)
        target_pos = gather_tokens(batch.tokens.pos, mask.target)
        prefix = None if encoded.cls is None else encoded.cls.unsqueeze(1)
        return self.predictor(encoded.tokens.x, encoded.tokens.pos, target_pos, prefix), encoded

    def targets(self, batch: Batch, teacher: Any) -> Tensor:
        """The teacher's features of the full input at ``batch.mask.target``: ``[B, Nt, teacher_dim]``, float32."""
        mask = _require_mask(batch)
        if teacher is None:
            raise ValueError("jepa needs a teacher (the target encoder): set the stage's `teacher: {name: ema}`")
        h = teacher_targets(batch, teacher, self.target_layers, self.norm_targets)
        if h.shape[-1] != self.out_dim:
            raise ValueError(f"jepa predicts {self.out_dim}-wide features but the teacher gives {h.shape[-1]}: "
                             f"set the objective's teacher_dim to {h.shape[-1]}")
        return gather_tokens(h, mask.target)

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        """Latent-prediction loss over the target tokens.

        Raises:
            ValueError: the batch has no mask or there is no teacher.
        """
        target = self.targets(batch, teacher)
        pred, encoded = self._predict(batch, student)
        pred = pred.float()
        if self.loss_kind == "smooth_l1":
            loss = F.smooth_l1_loss(pred, target)
        else:
            loss = F.l1_loss(pred, target)
        # collapse signal: each feature's std over the batch's predicted tokens, averaged over features
        pred_std = pred.detach().reshape(-1, pred.shape[-1]).std(0).mean()
        metrics = {"pred_std": pred_std}
        if self.var_weight:
            hinge = variance_hinge(encoded.pool("mean").float())
            loss = loss + self.var_weight * hinge
            metrics["var_hinge"] = hinge.detach()
        return ObjectiveOutput(loss, {"loss": loss.detach(), **metrics})


def variance_hinge(x: Tensor, eps: float = 1e-4) -> Tensor:
    """VICReg's variance term: ``mean_d relu(1 - sqrt(var_d + eps))`` over the rows of ``x [B, D]``."""
    return F.relu(1.0 - torch.sqrt(x.var(0) + eps)).mean()


def _require_mask(batch: Batch) -> Any:
    if batch.mask is None:
        raise ValueError("jepa needs a masker in its stage (stage.masker: multiblock)")
    return batch.mask
