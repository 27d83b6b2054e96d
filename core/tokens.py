"""`Tokens`: the one currency between modality code and the modality-free core."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Tokens", "gather_tokens"]


def gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Gather along the token axis: ``t [B, N, ...]``, ``index [B, M]`` -> ``[B, M, ...]``."""
    if t.dim() == 2:
        return torch.gather(t, 1, index)
    expanded = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return torch.gather(t, 1, expanded)


@dataclass
class Tokens:
    """A batch of token sets.

    Attributes:
        x: embeddings ``[B, N, D]``.
        pos: positions ``[B, N, k]``: integer grid coordinates (long) or continuous coordinates
            (float); the positional encoding is made from them.
        padding: ``[B, N]`` bool, True where a slot holds no real token; None when every set is full.
        grid: the token grid's shape (e.g. ``(H, W)`` or ``(T, H, W)``) where there is one.
        targets: per-token reconstruction targets in input space ``[B, N, P]``, or None.
        modality: a label for logging only; core code never branches on it.
        sensor: which of a multi-sensor backbone's further sensors made them (its sample field);
            "" for the first (or only) sensor. It picks the positional encoding, nothing else.
        source: ``[B, M]`` long, the token each of the ``M`` input elements went into (a lidar
            point's pillar), -1 where none; indices into the full set, kept as they are by
            `select`. Given by tokenizers whose tokens pool input elements, for objectives and
            probes that map token features back onto the input (per-point labels, calibration).
    """

    x: Tensor
    pos: Tensor
    padding: Optional[Tensor] = None
    grid: Optional[tuple[int, ...]] = None
    targets: Optional[Tensor] = None
    modality: str = ""
    sensor: str = ""
    source: Optional[Tensor] = None

    def __post_init__(self) -> None:
        b, n = self.x.shape[:2]
        for name in ("pos", "padding", "targets"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape[:2]) != (b, n):
                raise ValueError(f"Tokens.{name} has shape {tuple(t.shape)}; its first two dims must be (B, N) = {(b, n)}")
        if self.source is not None and (self.source.shape[0] != b or self.source.dim() != 2 or self.source.is_floating_point()):
            raise ValueError(f"Tokens.source must be an integer [B={b}, M] tensor, got {self.source.dtype} {tuple(self.source.shape)}")
        if self.padding is not None and self.padding.dtype != torch.bool:
            raise ValueError(f"Tokens.padding must be bool, got {self.padding.dtype}")

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def valid(self) -> Tensor:
        """``[B, N]`` bool, True for real tokens."""
        if self.padding is None:
            return torch.ones(self.x.shape[:2], dtype=torch.bool, device=self.x.device)
        return ~self.padding

    def select(self, index: Tensor) -> "Tokens":
        """The tokens at ``index [B, M]``, every per-token field gathered alike."""
        return replace(
            self,
            x=gather_tokens(self.x, index),
            pos=gather_tokens(self.pos, index),
            padding=None if self.padding is None else gather_tokens(self.padding, index),
            targets=None if self.targets is None else gather_tokens(self.targets, index),
        )

    def with_x(self, x: Tensor) -> "Tokens":
        return replace(self, x=x)

    def to(self, *args, **kwargs) -> "Tokens":
        """Move tensors like ``Tensor.to``; integer positions and bool padding keep their dtype."""
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return t if device is None else t.to(device)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name in ("x", "pos", "padding", "targets", "source")})
