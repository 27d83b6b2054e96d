"""What every objective receives and returns, and the attributes the trainer and build read off it.

`Objective` is the contract a registered objective keeps (``register_objectives`` in
``anymodal.plugins.hookspecs`` points here); `TargetSwitch` is the tokenizer side of its
``needs_targets``. Neither is a base class: a plugin's objective is any ``nn.Module`` of that shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from .masking import Mask
from .tokens import Tokens

__all__ = ["Batch", "ObjectiveOutput", "Objective", "TargetSwitch", "reads_targets"]


@dataclass
class Batch:
    """One training batch as objectives see it.

    Attributes:
        raw: the collated sample dict (modality tensors, ``label``, ``text``, ...).
        tokens: the student tokenizer's output for ``raw``.
        mask: the stage masker's choice, or None when the stage does not mask.
        generator: the step's generator, for objectives that draw random numbers (shuffles).
        cache: per-batch memo (teacher outputs), so objectives sharing a teacher run it once.
    """

    raw: dict[str, Any]
    tokens: Tokens
    mask: Optional[Mask]
    generator: torch.Generator
    cache: dict[Any, Any] = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    """The loss to minimize and named metrics.

    Attributes:
        loss: a scalar tensor with gradients.
        metrics: name -> detached 0-d tensor (or a plain float). Tensors are read once per step by
            the trainer, after the forward pass, so an objective never synchronizes the device
            (no ``.item()`` or ``float(...)`` in a forward) and ``run.compile=objectives`` can trace it.
    """

    loss: Tensor
    metrics: dict[str, Union[Tensor, float]] = field(default_factory=dict)


class Objective(Protocol):
    """What a stage's objectives are to the trainer and to ``core.build``.

    Called as ``objective(batch, student, teacher)``: ``student`` is the `Backbone` being trained
    (``tokenize``, ``encode(tokens, index=None, layers=0)``, ``pool``), ``teacher`` the stage's
    teacher (``core.teachers.Teacher``) or None. It owns its heads (decoders, predictors,
    projections): they are trained, checkpointed and sharded with the backbone.

    Three class attributes are read, each False when absent:

    Attributes:
        needs_mask: build refuses a stage without a ``masker:``, so ``batch.mask`` is never None.
        needs_teacher: build refuses a stage without a ``teacher:``, so ``teacher`` is never None.
        needs_targets: it reads ``batch.tokens.targets`` (reconstruction targets in input space).
            The trainer sets the tokenizer's `TargetSwitch` to whether any objective of the stage
            does, so a stage without one does not pay for the targets.

    ``sensor_args`` (a tuple of argument names, empty when absent) lists the arguments that name
    another sensor of a scene: the config check refuses a name the modality's sensors lack.

    An objective may also have ``check_batch(raw)``: the trainer calls it on each collated batch
    before the batch moves to the device, so checks that read the data's values (calibration,
    timestamps) cost no device sync; it raises ``DataError`` naming the frame.
    """

    needs_mask: ClassVar[bool]
    needs_teacher: ClassVar[bool]
    needs_targets: ClassVar[bool]

    def __call__(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput: ...


@runtime_checkable
class TargetSwitch(Protocol):
    """A tokenizer whose reconstruction targets can be turned off (``Tokens.targets`` is then None).

    Attributes:
        make_targets: True to fill ``Tokens.targets``; the trainer sets it per stage from the
            objectives' ``needs_targets`` (`reads_targets`).
    """

    make_targets: bool


def reads_targets(objectives: Iterable[Objective]) -> bool:
    """Whether any of ``objectives`` reads the tokenizer's reconstruction targets."""
    return any(getattr(objective, "needs_targets", False) for objective in objectives)
