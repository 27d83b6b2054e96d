"""What every objective receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from .masking import Mask
from .tokens import Tokens

__all__ = ["Batch", "ObjectiveOutput", "Objective"]


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
    """The loss to minimize and named metrics: floats or 0-d tensors (the trainer reads tensors
    once per step, after the forward pass, so an objective need not synchronize the device)."""

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput: ...
