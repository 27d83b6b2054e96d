"""Teachers: models that objectives distil from or predict. Registered by name (``ema``, ``stage``,
``timm`` and plugins'); all run under ``no_grad`` in eval mode, in the step's autocast dtype.

A teacher (`Teacher`) is called as ``teacher(batch, layers=k)`` and returns an `Encoded` over the
*student's* full token set (same order, positions and padding), so objectives index teacher and
student features with the same mask indices. Objectives call `teacher_encode`, which runs each
teacher once per batch however many objectives ask. A teacher that learns during the stage (an
EMA) is also a `MovingTeacher`: the trainer updates it after each optimizer step and checkpoints it.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import logging
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .backbone import Backbone
from .checkpoint import StateMismatchError, checkpoint_part, load_checkpoint, load_model_state, read_weights_file
from .encoder import Encoded
from .objective import Batch
from .tokens import Tokens

__all__ = ["Teacher", "MovingTeacher", "teacher_encode", "BackboneTeacher", "EmaTeacher", "StageTeacher", "TimmTeacher"]

log = logging.getLogger("anymodal.teachers")


class Teacher(Protocol):
    """What a stage's teacher is to objectives and the trainer (``register_teachers`` builds one).

    An ``nn.Module``, moved to the training device and called under ``no_grad`` through
    `teacher_encode`; it keeps itself in eval mode. Frozen teachers are rebuilt from the config on
    resume, so their state is never checkpointed.

    Attributes:
        dim: the width of its features; objectives with a ``teacher_dim`` parameter get it (None
            when a teacher lacks it: the objective then assumes the student's width).
    """

    dim: int

    def __call__(self, batch: Batch, layers: int = 0, sensor: Optional[str] = None) -> Encoded:
        """Encode ``batch.raw`` over the student's full token set (``batch.tokens``' order and padding).

        Args:
            batch: the step's batch.
            layers: also return the last ``layers`` block outputs in ``Encoded.layers`` (oldest first).
            sensor: encode this sample field instead (a scene's other sensor: a camera whose
                features a lidar student distils), over the teacher's own tokens of it.
        """
        ...


@runtime_checkable
class MovingTeacher(Protocol):
    """A `Teacher` that changes during its stage (an EMA of the student): the trainer calls `update`
    after every optimizer step, saves its state in each checkpoint and restores it on resume, and
    under FSDP shards it like the student."""

    def update(self, student: Backbone, step: int, total: int) -> None:
        """Move towards ``student`` after optimizer step ``step`` (1-based) of the stage's ``total``."""
        ...


def teacher_encode(batch: Batch, teacher: Optional[nn.Module], layers: int = 0, sensor: Optional[str] = None) -> Encoded:
    """The teacher's encoding of ``batch`` over all tokens (of ``sensor``, when given), computed once
    per batch, layer count and sensor.

    Raises:
        ValueError: when the stage has no teacher.
    """
    if teacher is None:
        raise ValueError("this objective needs a teacher: give its stage a `teacher:` (ema, stage, timm, ...)")
    cached = [(k, v) for k, v in batch.cache.items()
              if isinstance(k, tuple) and k[0] == "teacher" and k[1] >= layers and k[2] == sensor]
    if cached:  # any run with at least as many layers holds the final tokens too
        encoded = cached[0][1]
        return encoded if len(encoded.layers) == layers else replace(encoded, layers=encoded.layers[len(encoded.layers) - layers:])
    with torch.no_grad():
        encoded = teacher(batch, layers=layers) if sensor is None else teacher(batch, layers=layers, sensor=sensor)
    batch.cache[("teacher", layers, sensor)] = encoded
    return encoded


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class BackboneTeacher(nn.Module):
    """A frozen copy of an anymodal `Backbone` (same tokenizer and encoder config as the student)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = _freeze(backbone)
        self.dim = backbone.encoder.dim
        self.train(False)

    def train(self, mode: bool = True) -> "BackboneTeacher":
        return super().train(False)  # always eval: no dropout/drop-path in targets

    @torch.no_grad()
    def forward(self, batch: Batch, layers: int = 0, sensor: Optional[str] = None) -> Encoded:
        sensor = sensor or batch.tokens.sensor or None  # default: the sensor the student's batch holds
        return self.backbone.encode(self.backbone.tokenize(batch.raw, sensor), None, layers)


class EmaTeacher(BackboneTeacher):
    """Exponential moving average of the student (BYOL, DINO, I-JEPA's target encoder).

    The momentum rises linearly from ``momentum[0]`` to ``momentum[1]`` over the stage.

    Args:
        student: the student backbone (copied at construction).
        momentum: start and end momentum.
    """

    def __init__(self, student: Backbone, momentum: Sequence[float] = (0.996, 1.0)) -> None:
        super().__init__(copy.deepcopy(student))
        if len(momentum) != 2 or not all(0.0 <= m <= 1.0 for m in momentum):
            raise ValueError(f"ema momentum must be [start, end] within [0, 1], got {list(momentum)}")
        self.momentum = (float(momentum[0]), float(momentum[1]))

    def momentum_at(self, step: int, total: int) -> float:
        m0, m1 = self.momentum
        return m0 + (m1 - m0) * min(step, total) / max(total, 1)

    @torch.no_grad()
    def update(self, student: Backbone, step: int, total: int) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for parameters; buffers are copied."""
        m = self.momentum_at(step, total)
        mine = [p for p in self.backbone.parameters()]
        theirs = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(mine, m)
        torch._foreach_add_(mine, theirs, alpha=1.0 - m)
        for b_t, b_s in zip(self.backbone.buffers(), student.buffers()):
            b_t.copy_(b_s)


class StageTeacher(BackboneTeacher):
    """The frozen backbone of an earlier stage of the same recipe (VideoPrism stage 2, UMT).

    Args:
        student: the student backbone (its architecture is reused).
        folder: the run folder, where the earlier stage wrote ``<stage>-final.pt``.
        stage: the earlier stage's name.
    """

    def __init__(self, student: Backbone, folder: Any, stage: str) -> None:
        path = folder.final(stage)
        if not Path(path).is_file():
            raise FileNotFoundError(f"teacher {{name: stage, stage: {stage}}} needs {path}, which this run has not written: "
                                    f"is stage {stage!r} listed before the stage that uses it?")
        backbone = copy.deepcopy(student)
        load_model_state(backbone, checkpoint_part(load_checkpoint(path), "backbone", path), f"stage teacher {path}")
        super().__init__(backbone)
        self.stage = stage


class TimmTeacher(nn.Module):
    """Any timm ViT as a frozen teacher (UMT distils from CLIP ViTs this way).

    The teacher reads the student's input field and must produce one token per student token
    (same patch grid); extra prefix tokens (class, registers) are dropped. Called for another
    sensor of a scene (a camera, for a lidar student), it reads that field and returns its own grid.

    Args:
        student: the student backbone (gives the input field and the token count to match).
        model: a timm model name, for example ``vit_base_patch16_clip_224``.
        checkpoint: a local weights file (``.safetensors`` or a torch state dict); without one the
            teacher is randomly initialized and a warning says so.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``).
    """

    def __init__(self, student: Backbone, model: str, checkpoint: Optional[str] = None,
                 model_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        from .timm_compat import import_timm

        timm = import_timm()
        self.net = timm.create_model(model, pretrained=False, num_classes=0, **(model_kwargs or {}))
        if checkpoint:
            result = self.net.load_state_dict(read_weights_file(checkpoint), strict=False)
            unexpected = [k for k in result.unexpected_keys if not k.startswith("head")]
            if result.missing_keys or unexpected:
                raise StateMismatchError(f"timm teacher {model}: {checkpoint} does not fit (missing {result.missing_keys[:4]}, "
                                 f"unexpected {unexpected[:4]})")
        else:
            log.warning("timm teacher %s has no checkpoint: it is randomly initialized", model)
        _freeze(self.net)
        self.input_key = student.sensor
        self.prefix = int(getattr(self.net, "num_prefix_tokens", 0))
        self.dim = int(self.net.num_features)
        self.train(False)

    def train(self, mode: bool = True) -> "TimmTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch, layers: int = 0, sensor: Optional[str] = None) -> Encoded:
        x = batch.raw[sensor or batch.tokens.sensor or self.input_key]
        full = self.net.forward_features(x)
        feats = full[:, self.prefix:]
        kept = []
        if layers:
            kept = self.net.forward_intermediates(x, indices=layers, output_fmt="NLC", intermediates_only=True, norm=False)
            kept = [k[:, self.prefix:] if k.shape[1] != feats.shape[1] else k for k in kept]
        if sensor:  # another sensor than the student's: the teacher's own patch grid, row-major
            grid = tuple(int(g) for g in self.net.patch_embed.grid_size)
            cls = self.net.forward_head(full, pre_logits=True) if self.prefix else feats.mean(1)
            rows, cols = torch.meshgrid(torch.arange(grid[0], device=x.device), torch.arange(grid[1], device=x.device), indexing="ij")
            pos = torch.stack([rows.flatten(), cols.flatten()], -1).expand(x.shape[0], -1, -1)
            return Encoded(Tokens(feats, pos, grid=grid, sensor=sensor), cls, kept)
        tokens = batch.tokens
        if feats.shape[1] != tokens.num_tokens:
            raise ValueError(f"timm teacher gives {feats.shape[1]} tokens per sample, the student's tokenizer "
                             f"{tokens.num_tokens}: match the teacher's img_size/patch_size to the student's")
        cls = self.net.forward_head(full, pre_logits=True) if self.prefix else feats.mean(1)
        return Encoded(replace(tokens, x=feats), cls, kept)
