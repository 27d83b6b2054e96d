"""Waveform transforms. Each works on ONE waveform ``[T]`` and takes a ``torch.Generator`` that
supplies all of its randomness, drawing the same amount whatever the outcome, so an augmentation is
reproducible from its seed. None of them loops over samples in Python."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ...core.args import float_arg, fraction_arg, int_arg, range_arg
from ...core.errors import DataError

__all__ = ["RandomCropAudio", "RandomGain", "TimeMask", "FreqMask", "AddNoise"]

# --------------------------------------------------------------------------------------------
# transforms


def _check_wave(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{who} expects one mono waveform tensor [T], got {shape}")
    if not x.is_floating_point():
        raise DataError(f"{who} expects a floating-point tensor, got {x.dtype}")


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _spans(length: int, count: int, max_width: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``count`` random spans of ``[0, length)``: (start, end) positions, widths up to ``max_width`` of ``length``.

    A span's width is uniform in ``[0, max_width]`` and its start uniform over where it fits, as in
    SpecAugment; two draws per span whatever ``length`` is.
    """
    draws = torch.rand(2, count, generator=generator, dtype=torch.float64)
    width = draws[0] * max_width
    start = draws[1] * (1.0 - width)
    return start * length, (start + width) * length


class RandomCropAudio:
    """Crop to at most ``seconds`` at a random offset; shorter clips are returned as they are.

    Batches stay ragged (the collate pads them), so nothing is padded here.
    """

    def __init__(self, seconds: float, sample_rate: int = 16000) -> None:
        self.seconds, self.sample_rate = float_arg("seconds", seconds), int_arg("sample_rate", sample_rate, 1)
        if self.seconds <= 0:
            raise DataError(f"seconds must be > 0, got {seconds}")
        self.length = max(1, round(self.seconds * self.sample_rate))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_wave(x, "RandomCropAudio")
        u = torch.rand(1, generator=generator, dtype=torch.float64).item()  # drawn even when no crop is needed
        if x.shape[0] <= self.length:
            return x
        offset = min(int(u * (x.shape[0] - self.length + 1)), x.shape[0] - self.length)
        return x[offset:offset + self.length]

    def __repr__(self) -> str:
        return f"RandomCropAudio(seconds={self.seconds}, sample_rate={self.sample_rate})"


class RandomGain:
    """Scale by a gain uniform in ``db`` decibels (amplitude ``10 ** (g / 20)``); no clipping."""

    def __init__(self, db: Sequence[float] = (-6.0, 6.0)) -> None:
        self.db = range_arg("db", db)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_wave(x, "RandomGain")
        gain_db = _uniform(*self.db, 1, generator).item()
        return x * 10.0 ** (gain_db / 20.0)

    def __repr__(self) -> str:
        return f"RandomGain(db={list(self.db)})"


class TimeMask:
    """Zero ``count`` random spans, each up to ``max_fraction`` of the clip (they may overlap)."""

    def __init__(self, max_fraction: float = 0.1, count: int = 2) -> None:
        self.max_fraction, self.count = fraction_arg("max_fraction", max_fraction), int_arg("count", count, 0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_wave(x, "TimeMask")
        start, end = _spans(x.shape[0], self.count, self.max_fraction, generator)
        t = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
        masked = ((t >= start.floor()) & (t < end.floor())).any(dim=1)
        return x.masked_fill(masked.to(x.device), 0.0)

    def __repr__(self) -> str:
        return f"TimeMask(max_fraction={self.max_fraction}, count={self.count})"


def _mel(hz: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(hz / 700.0)


def _hz(mel: Tensor) -> Tensor:
    return 700.0 * torch.expm1(mel / 1127.0)


class FreqMask:
    """Frequency masking on the waveform: zero ``count`` random bands of the clip's rFFT, then invert.

    Bands are drawn on the mel scale (each up to ``max_fraction`` of the mel range from 0 Hz to
    Nyquist), like SpecAugment's masks over mel channels, so a band is narrow in Hz where hearing
    is fine-grained; ``sample_rate`` maps mel to rFFT bins. The whole clip is one FFT, so the band
    is removed exactly, at every time.
    """

    def __init__(self, max_fraction: float = 0.1, count: int = 2, sample_rate: int = 16000) -> None:
        self.max_fraction, self.count = fraction_arg("max_fraction", max_fraction), int_arg("count", count, 0)
        self.sample_rate = int_arg("sample_rate", sample_rate, 1)

    def bands(self, generator: torch.Generator | None = None) -> Tensor:
        """The ``[count, 2]`` bands (low, high) in Hz that the next call with ``generator`` removes."""
        top = _mel(torch.tensor(self.sample_rate / 2, dtype=torch.float64))
        low, high = _spans(1, self.count, self.max_fraction, generator)
        return torch.stack([_hz(low * top), _hz(high * top)], dim=1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_wave(x, "FreqMask")
        bands = self.bands(generator)
        n = x.shape[0]
        spectrum = torch.fft.rfft(x.double())
        freq = torch.arange(spectrum.shape[0], dtype=torch.float64, device=x.device) * (self.sample_rate / max(n, 1))
        bands = bands.to(x.device)
        masked = ((freq[:, None] >= bands[:, 0]) & (freq[:, None] < bands[:, 1])).any(dim=1)
        return torch.fft.irfft(spectrum.masked_fill(masked, 0), n=n).to(x.dtype)

    def __repr__(self) -> str:
        return f"FreqMask(max_fraction={self.max_fraction}, count={self.count}, sample_rate={self.sample_rate})"


class AddNoise:
    """Add white Gaussian noise at a signal-to-noise ratio uniform in ``snr_db`` (of the clip's power)."""

    def __init__(self, snr_db: Sequence[float] = (10.0, 30.0)) -> None:
        self.snr_db = range_arg("snr_db", snr_db)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_wave(x, "AddNoise")
        snr = _uniform(*self.snr_db, 1, generator).item()
        noise = torch.randn(x.shape[0], generator=generator, dtype=torch.float64)
        power = x.double().square().mean().item() if x.shape[0] else 0.0
        return x + (noise * math.sqrt(power / 10.0 ** (snr / 10.0))).to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"AddNoise(snr_db={list(self.snr_db)})"


