"""The student: the tokenizer of each sensor in front of the one shared encoder."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .encoder import Encoded, Encoder
from .tokens import Tokens

__all__ = ["Backbone", "SensorInput"]


class SensorInput(nn.Module):
    """A further sensor of a scene sample: its tokenizer and the positional encoding of its positions
    (which may have other axes than the first sensor's, whose encoding the encoder owns), and its
    own encoder when the sensors do not share one (None: the backbone's)."""

    def __init__(self, tokenizer: nn.Module, posenc: nn.Module, encoder: Optional[Encoder] = None) -> None:
        super().__init__()
        self.tokenizer, self.posenc, self.encoder = tokenizer, posenc, encoder


class Backbone(nn.Module):
    """Tokenizer(s) + encoder; what pre-training trains and what is exported.

    One sensor (the usual case): ``tokenizer`` reads ``batch[tokenizer.input_key]``. A scene sample
    holds several sensors, each a sample field of its own name (``cam_front``, ``lidar_top``):
    ``sensor`` names the field ``tokenizer`` reads and ``others`` the further sensors. Every
    sensor's tokens then go through the one encoder (or the sensor's own, where it has one) with a
    learned per-sensor embedding added, and carry their sensor's name (`Tokens.sensor`) so `encode`
    uses their positional encoding and encoder.

    Args:
        tokenizer: the first sensor's tokenizer.
        encoder: the shared `Encoder` (its positional encoding is the first sensor's).
        pool: how `embed` pools tokens: ``mean`` or ``cls``.
        sensor: the sample field ``tokenizer`` reads; default its ``input_key``.
        others: further sensors, by sample field.
    """

    def __init__(self, tokenizer: nn.Module, encoder: Encoder, pool: str = "mean", sensor: Optional[str] = None,
                 others: Optional[Mapping[str, SensorInput]] = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.pool_mode = pool
        self.sensor = sensor or tokenizer.input_key
        self.others = nn.ModuleDict(others or {})
        if self.sensor in self.others:
            raise ValueError(f"sensor {self.sensor!r} is given twice: as the first sensor and among the others")
        # single-sensor backbones have no sensor embedding, so their weights are what they always were
        self.sensor_embed = nn.Parameter(torch.randn(1 + len(self.others), encoder.dim) * 0.02) if self.others else None

    @property
    def sensors(self) -> list[str]:
        """The sample fields this backbone tokenizes, the first sensor first."""
        return [self.sensor, *self.others]

    def tokenizer_of(self, sensor: Optional[str] = None) -> nn.Module:
        """The tokenizer of ``sensor`` (None: the first sensor)."""
        if sensor is None or sensor == self.sensor:
            return self.tokenizer
        if sensor not in self.others:
            raise KeyError(f"the backbone has no sensor {sensor!r}; sensors: {', '.join(self.sensors)}")
        return self.others[sensor].tokenizer

    def tokenize(self, batch: Mapping[str, Any], sensor: Optional[str] = None) -> Tokens:
        """The Tokens of ``batch[sensor]`` (None: the first sensor), with ``<sensor>_padding`` for ragged input."""
        key = self.sensor if sensor is None else sensor
        tokenizer = self.tokenizer_of(key)
        if key not in batch:
            raise KeyError(f"batch has no field {key!r} for the tokenizer; fields: {', '.join(sorted(batch))}")
        padding = batch.get(f"{key}_padding")  # ragged inputs (point clouds, waveforms): see core.data.collate
        tokens = tokenizer(batch[key]) if padding is None else tokenizer(batch[key], padding=padding)
        if self.sensor_embed is None:
            return tokens
        embed = self.sensor_embed[self.sensors.index(key)].to(tokens.x.dtype)
        return replace(tokens, x=tokens.x + embed, sensor="" if key == self.sensor else key)

    def encode(self, tokens: Tokens, index: Optional[Tensor] = None, layers: int = 0,
               posenc: Optional[nn.Module] = None) -> Encoded:
        if tokens.sensor:
            other = self.others[tokens.sensor]
            if other.encoder is not None:  # it owns that sensor's positional encoding
                return other.encoder(tokens, index, layers, posenc)
            posenc = other.posenc if posenc is None else posenc
        return self.encoder(tokens, index, layers, posenc)

    def pool(self, encoded: Encoded) -> Tensor:
        return encoded.pool(self.pool_mode)

    def embed(self, batch: Mapping[str, Any], sensor: Optional[str] = None) -> Tensor:
        """One pooled feature vector per sample ``[B, D]`` from all of a sensor's tokens (evaluation)."""
        return self.pool(self.encode(self.tokenize(batch, sensor)))
