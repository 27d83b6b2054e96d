"""Audio as tokens: a Kaldi-compatible log-mel frontend, then spectrogram patches or frame groups.

Conventions follow Audio-MAE: 16 kHz mono waveforms, 128 mel bins, 25 ms windows every 10 ms,
log-mel energies normalized with the dataset's mean and std (``(x - mean) / (2 * std)``), 16x16
patches over (time, mel). The frontend runs in torch on the batch, on the device, with no loop
over samples: every frame of every clip goes through one strided view, one FFT and one matmul.

Clips of different lengths arrive zero-padded with ``<input_key>_padding`` ``[B, T]`` (the collate
adds it); tokens whose time span lies past a clip's end are marked padding, so a ragged batch
encodes like each clip alone. ``frames`` instead crops or pads every spectrogram to a fixed length.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.tokens import Tokens
from .common import any_true, grid_positions, normalize_per_token, targets_for_viewing

__all__ = ["LogMelFrontend", "mel_filterbank", "SpectrogramPatchTokenizer", "SpectrogramFrameTokenizer"]

_EPS = torch.finfo(torch.float32).eps  # Kaldi's floor under the log


def mel_scale(freq: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
                   high_freq: Optional[float] = None) -> Tensor:
    """Kaldi's triangular mel filters, ``[n_fft // 2 + 1, n_mels]`` (triangles in mel, not Hz)."""
    nyquist = sample_rate / 2
    high = nyquist if high_freq is None else high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise ValueError(f"mel filterbank needs 0 <= low_freq < high_freq <= {nyquist} Hz, got {low_freq}, {high}")
    mel_lo, mel_hi = mel_scale(torch.tensor(low_freq, dtype=torch.float64)), mel_scale(torch.tensor(high, dtype=torch.float64))
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    left = mel_lo + delta * torch.arange(n_mels, dtype=torch.float64)
    centre, right = left + delta, left + 2 * delta
    bins = mel_scale(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))[:, None]
    up = (bins - left) / (centre - left)
    down = (right - bins) / (right - centre)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(weights, (0, 0, 0, 1)).float()  # the Nyquist bin gets no weight, as in Kaldi


class LogMelFrontend(nn.Module):
    """Log-mel filterbank energies of a batch of waveforms, Kaldi ``fbank``-compatible.

    Per frame: remove the DC offset, pre-emphasis, window, zero-pad to a power of two, power
    spectrum, mel filters, log (floored at float32 epsilon). Frames whose window does not fit in
    the clip are dropped (Kaldi's ``snip_edges``).

    Args:
        sample_rate: the waveforms' rate in Hz.
        n_mels: mel bins.
        win_ms, hop_ms: window length and shift in milliseconds.
        window: ``hanning`` (Audio-MAE's choice), ``povey`` (Kaldi's default) or ``hamming``.
        preemphasis: the pre-emphasis coefficient.
        low_freq, high_freq: the filterbank's band in Hz (``high_freq`` None: Nyquist).
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 128, win_ms: float = 25.0, hop_ms: float = 10.0,
                 window: str = "hanning", preemphasis: float = 0.97, low_freq: float = 20.0,
                 high_freq: Optional[float] = None) -> None:
        super().__init__()
        self.sample_rate, self.n_mels, self.preemphasis = sample_rate, n_mels, preemphasis
        self.win = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.n_fft = 1 << (self.win - 1).bit_length()
        n = torch.arange(self.win, dtype=torch.float64)
        hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (self.win - 1))
        windows = {"hanning": hann, "povey": hann.pow(0.85),
                   "hamming": 0.54 - 0.46 * torch.cos(2 * math.pi * n / (self.win - 1))}
        if window not in windows:
            raise ValueError(f"window must be one of {', '.join(windows)}, got {window!r}")
        self.register_buffer("window", windows[window].float(), persistent=False)
        self.register_buffer("mel", mel_filterbank(n_mels, self.n_fft, sample_rate, low_freq, high_freq), persistent=False)

    def num_frames(self, samples: Tensor) -> Tensor:
        """Frames of clips with ``samples`` samples (0 for clips shorter than a window)."""
        return torch.clamp(torch.div(samples - self.win, self.hop, rounding_mode="floor") + 1, min=0)

    def forward(self, wave: Tensor) -> Tensor:
        """``[B, T]`` waveforms -> ``[B, frames, n_mels]`` log-mel energies (float32)."""
        if wave.dim() != 2:
            raise ValueError(f"log-mel frontend expects mono waveforms [B, T], got shape {tuple(wave.shape)}")
        if wave.shape[1] < self.win:
            raise ValueError(f"clips of {wave.shape[1]} samples are shorter than one {self.win}-sample window")
        frames = wave.float().unfold(1, self.win, self.hop)  # [B, F, win], a view
        frames = frames - frames.mean(-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0], as Kaldi
        frames = (frames - self.preemphasis * previous) * self.window
        power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)
        return torch.clamp(power @ self.mel, min=_EPS).log()


class _SpectrogramTokenizer(nn.Module):
    """Shared by the patch and frame tokenizers: frontend, normalization, ragged lengths."""

    def __init__(self, dim: int, patch: tuple[int, int], sample_rate: int, n_mels: int, max_seconds: float,
                 frames: Optional[int], mean: float, std: float, norm_targets: bool, input_key: str,
                 frontend: Optional[dict[str, Any]]) -> None:
        super().__init__()
        self.dim, self.input_key, self.norm_targets = dim, input_key, norm_targets
        self.make_targets = True  # the trainer turns it off when no objective of the stage reads targets
        self.frontend = LogMelFrontend(sample_rate, n_mels, **(frontend or {}))
        self.patch_t, self.patch_f = patch
        if n_mels % self.patch_f:
            raise ValueError(f"n_mels {n_mels} is not a multiple of the patch's mel size {self.patch_f}")
        if frames is not None and (frames <= 0 or frames % self.patch_t):
            raise ValueError(f"frames {frames} must be a positive multiple of the patch's time size {self.patch_t}")
        self.frames, self.mean, self.std = frames, float(mean), float(std)
        max_frames = frames or int(self.frontend.num_frames(torch.tensor(int(max_seconds * sample_rate))))
        self.max_time_tokens = max(1, max_frames // self.patch_t)
        self.target_dim = self.patch_t * self.patch_f

    def spectrogram(self, wave: Tensor, padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Normalized ``[B, F, n_mels]`` log-mels cut to whole patches, and each clip's patch count in time ``[B]``."""
        spec = (self.frontend(wave) - self.mean) / (2 * self.std)
        b, f = spec.shape[:2]
        if self.frames is not None:
            spec = F.pad(spec[:, :self.frames], (0, 0, 0, max(0, self.frames - f)))
            return spec, torch.full((b,), self.frames // self.patch_t, device=spec.device)
        if f < self.patch_t:
            raise ValueError(f"clips give {f} frames, fewer than one patch of {self.patch_t} "
                             f"({self.patch_t * self.frontend.hop / self.frontend.sample_rate:.2f} s)")
        whole = f // self.patch_t
        if padding is None:
            return spec[:, :whole * self.patch_t], torch.full((b,), whole, device=spec.device)
        samples = (~padding).sum(1)
        # a clip shorter than one patch keeps one token (partly silence) rather than none
        counts = torch.clamp(self.frontend.num_frames(samples) // self.patch_t, min=1)
        return spec[:, :whole * self.patch_t], counts

    def _targets(self, patches: Tensor) -> Tensor:
        return normalize_per_token(patches) if self.norm_targets else patches

    def _check(self, wave: Tensor) -> None:
        if wave.dim() != 2:
            raise ValueError(f"audio tokenizer expects mono waveforms [B, T] in batch[{self.input_key!r}], "
                             f"got shape {tuple(wave.shape)}")

    @classmethod
    def example_input(cls, batch_size: int) -> list[dict[str, Tensor]]:
        """Clips of 1.0 s and 0.6 s of a chirp: a ragged batch (the load-time contract check)."""
        out = []
        for i in range(batch_size):
            t = torch.arange(int(16000 * (1.0 if i % 2 == 0 else 0.6))) / 16000
            out.append({"audio": 0.3 * torch.sin(2 * math.pi * (300 + 900 * t) * t)})
        return out


class SpectrogramPatchTokenizer(_SpectrogramTokenizer):
    """Audio-MAE tokens: non-overlapping ``patch`` (time, mel) patches of the log-mel spectrogram.

    Positions are 2-D (time patch, mel patch) grid coordinates; targets are the patches' values,
    normalized per patch when ``norm_targets``.

    Args:
        dim: encoder width.
        patch: (frames, mel bins) per patch.
        sample_rate: the waveforms' rate (the dataset resamples to it).
        n_mels: mel bins.
        max_seconds: the longest clip expected (sets the grid of learned positions).
        frames: crop or zero-pad every spectrogram to this many frames (no ragged tokens); None: ragged.
        mean, std: the dataset's log-mel mean and std (Audio-MAE's AudioSet values by default).
        norm_targets: normalize each target patch.
        input_key: the batch field holding the waveforms ``[B, T]``.
        frontend: extra `LogMelFrontend` arguments (``win_ms``, ``hop_ms``, ``window``, ...).
    """

    pos_axes = 2

    def __init__(self, dim: int, patch: tuple[int, int] = (16, 16), sample_rate: int = 16000, n_mels: int = 128,
                 max_seconds: float = 10.0, frames: Optional[int] = None, mean: float = -4.27, std: float = 4.57,
                 norm_targets: bool = True, input_key: str = "audio", frontend: Optional[dict[str, Any]] = None) -> None:
        super().__init__(dim, tuple(patch), sample_rate, n_mels, max_seconds, frames, mean, std, norm_targets,
                         input_key, frontend)
        self.grid_size = (self.max_time_tokens, n_mels // self.patch_f)
        self.proj = nn.Conv2d(1, dim, kernel_size=(self.patch_t, self.patch_f), stride=(self.patch_t, self.patch_f))

    def patches(self, spec: Tensor) -> Tensor:
        """``[B, F, M]`` -> ``[B, (F/pt)*(M/pf), pt*pf]`` in (time, mel) row-major order."""
        b, f, m = spec.shape
        x = spec.reshape(b, f // self.patch_t, self.patch_t, m // self.patch_f, self.patch_f)
        return x.permute(0, 1, 3, 2, 4).reshape(b, -1, self.patch_t * self.patch_f)

    def preview(self, wave: Tensor) -> Tensor:
        """The log-mel spectrograms as ``[B, 1, mels, frames]`` images in [0, 1], low bins at the bottom."""
        return self._image(self.patches(self.spectrogram(wave, None)[0]), wave)

    def render(self, wave: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """Per-token targets (``[B, N, pt*pf]``, e.g. a reconstruction) as `preview` images; the
        patches where ``keep [B, N]`` is False are drawn grey."""
        true = self.patches(self.spectrogram(wave, None)[0])
        shown = targets_for_viewing(targets, true, torch.ones_like(keep), self.norm_targets)
        return self._image(shown, wave, keep)

    def _image(self, patches: Tensor, wave: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        b, n, _ = patches.shape
        view = (patches.float() + 1) / 2  # the normalized log-mel is mostly within [-1, 1]
        if keep is not None:
            view = torch.where(keep.unsqueeze(-1), view, torch.full_like(view, 0.5))
        t, m = n // (self.grid_size[1]), self.grid_size[1]
        spec = view.reshape(b, t, m, self.patch_t, self.patch_f).permute(0, 1, 3, 2, 4).reshape(b, t * self.patch_t, -1)
        return spec.transpose(1, 2).flip(1).unsqueeze(1)  # [B, 1, mels, frames]

    def forward(self, wave: Tensor, padding: Optional[Tensor] = None) -> Tokens:
        self._check(wave)
        spec, counts = self.spectrogram(wave, padding)
        x = self.proj(spec.unsqueeze(1).to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        grid = (spec.shape[1] // self.patch_t, spec.shape[2] // self.patch_f)
        pos = grid_positions(grid, x.shape[0], x.device)
        token_padding = pos[..., 0] >= counts[:, None]
        return Tokens(x=x, pos=pos, padding=token_padding if any_true(token_padding) else None, grid=grid,
                      targets=self._targets(self.patches(spec)) if self.make_targets else None, modality="audio")


class SpectrogramFrameTokenizer(_SpectrogramTokenizer):
    """Speech tokens: each spans all mel bins over ``frames_per_token`` frames (1-D positions in time).

    Args:
        frames_per_token: frames per token (4: 40 ms).
        The rest as `SpectrogramPatchTokenizer`.
    """

    pos_axes = 1

    def __init__(self, dim: int, frames_per_token: int = 4, sample_rate: int = 16000, n_mels: int = 128,
                 max_seconds: float = 10.0, frames: Optional[int] = None, mean: float = -4.27, std: float = 4.57,
                 norm_targets: bool = True, input_key: str = "audio", frontend: Optional[dict[str, Any]] = None) -> None:
        super().__init__(dim, (frames_per_token, n_mels), sample_rate, n_mels, max_seconds, frames, mean, std,
                         norm_targets, input_key, frontend)
        self.grid_size = (self.max_time_tokens,)
        self.proj = nn.Linear(self.target_dim, dim)

    def forward(self, wave: Tensor, padding: Optional[Tensor] = None) -> Tokens:
        self._check(wave)
        spec, counts = self.spectrogram(wave, padding)
        b, f, m = spec.shape
        targets = spec.reshape(b, f // self.patch_t, self.patch_t * m)
        x = self.proj(targets.to(self.proj.weight.dtype))
        grid = (targets.shape[1],)
        pos = grid_positions(grid, b, x.device)
        token_padding = pos[..., 0] >= counts[:, None]
        return Tokens(x=x, pos=pos, padding=token_padding if any_true(token_padding) else None, grid=grid,
                      targets=self._targets(targets) if self.make_targets else None, modality="audio")
