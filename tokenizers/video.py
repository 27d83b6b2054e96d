"""Video tubelets as tokens (ViViT tubelet embedding, VideoMAE).

A tubelet is a ``tt x th x tw`` block of pixels; a strided 3-D convolution embeds the
non-overlapping tubelets of a clip ``[B, C, T, H, W]`` into ``N = T/tt * H/th * W/tw`` tokens in
row-major ``(t, h, w)`` order. Paper: Arnab et al., "ViViT: A Video Vision Transformer" (2021);
Tong et al., "VideoMAE" (2022).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..core.tokens import Tokens
from .common import grid_positions, normalize_per_token, targets_for_viewing

__all__ = ["TubeletTokenizer", "tubeletify", "untubeletify", "frame_strip"]


def _tubelet_arg(tubelet: Sequence[int]) -> tuple[int, int, int]:
    if isinstance(tubelet, (str, bytes)) or not isinstance(tubelet, Sequence) or len(tubelet) != 3:
        raise ValueError(f"tubelet must be three integers (frames, height, width), got {tubelet!r}")
    out = tuple(int(v) for v in tubelet)
    if any(v < 1 or v != t for v, t in zip(out, tubelet)):
        raise ValueError(f"tubelet sizes must be positive integers, got {tubelet!r}")
    return out  # type: ignore[return-value]


def _check_divisible(shape: Sequence[int], tubelet: Sequence[int]) -> None:
    t, h, w = shape
    tt, th, tw = tubelet
    if t % tt or h % th or w % tw:
        raise ValueError(f"video of {t} frames x {h}x{w} pixels is not divisible into tubelets of "
                         f"{tt} frames x {th}x{tw} pixels")


def tubeletify(video: Tensor, tubelet: Sequence[int]) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B, N, tt*th*tw*C]``, tubelets in row-major ``(t, h, w)`` order.

    Each row holds one tubelet's pixels ordered ``(tt, th, tw, C)`` (channels fastest), as
    `anymodal.tokenizers.image.patchify` orders a patch.

    Raises:
        ValueError: If ``video`` is not 5-D or its sizes are not multiples of the tubelet's.
    """
    tt, th, tw = _tubelet_arg(tubelet)
    if video.dim() != 5:
        raise ValueError(f"tubeletify expects a video batch [B, C, T, H, W], got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    _check_divisible((t, h, w), (tt, th, tw))
    x = video.reshape(b, c, t // tt, tt, h // th, th, w // tw, tw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (t // tt) * (h // th) * (w // tw), tt * th * tw * c)


def untubeletify(tokens: Tensor, tubelet: Sequence[int], grid: Sequence[int], channels: int) -> Tensor:
    """Exact inverse of `tubeletify`: ``[B, N, tt*th*tw*C]`` -> ``[B, C, T, H, W]``.

    Args:
        tokens: per-tubelet pixels ``[B, N, P]``.
        tubelet: ``(tt, th, tw)``.
        grid: the tubelet grid ``(T/tt, H/th, W/tw)``; ``N`` must be its product.
        channels: ``C``; ``P`` must be ``tt*th*tw*C``.

    Raises:
        ValueError: If ``N`` or ``P`` do not match ``grid``, ``tubelet`` and ``channels``.
    """
    tt, th, tw = _tubelet_arg(tubelet)
    if len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W) in tubelets, got {tuple(grid)}")
    gt, gh, gw = (int(g) for g in grid)
    if tokens.dim() != 3 or tokens.shape[1] != gt * gh * gw or tokens.shape[2] != tt * th * tw * channels:
        raise ValueError(f"untubeletify expects [B, {gt * gh * gw}, {tt * th * tw * channels}] for grid {(gt, gh, gw)}, "
                         f"tubelet {(tt, th, tw)} and {channels} channels, got shape {tuple(tokens.shape)}")
    b = tokens.shape[0]
    x = tokens.reshape(b, gt, gh, gw, tt, th, tw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gt * tt, gh * th, gw * tw)


def frame_strip(video: Tensor, count: int = 4) -> Tensor:
    """``count`` evenly spaced frames (first and last included) side by side: ``[B, C, H, W*k]``.

    ``k = min(count, T)``; this is how a video is shown where pictures expect ``[B, C, H, W]``.
    """
    if video.dim() != 5:
        raise ValueError(f"frame_strip expects a video batch [B, C, T, H, W], got shape {tuple(video.shape)}")
    if count < 1:
        raise ValueError(f"frame_strip needs count >= 1, got {count}")
    t = video.shape[2]
    k = min(count, t)
    index = torch.linspace(0, t - 1, k, device=video.device).round().long()
    frames = video.index_select(2, index)  # [B, C, k, H, W]
    b, c, _, h, w = frames.shape
    return frames.permute(0, 1, 3, 2, 4).reshape(b, c, h, k * w)


class TubeletTokenizer(nn.Module):
    """Non-overlapping tubelets embedded by a strided 3-D convolution (kernel = stride = tubelet).

    Targets are the tubelets' pixels, normalized per tubelet (zero mean, unit variance over all
    of a tubelet's values, as MAE's ``norm_pix_loss`` does per patch) when ``norm_targets`` is true.
    Positions are the integer grid coordinates ``(t, h, w)`` of each tubelet.

    Args:
        dim: encoder width.
        frames: expected clip length (sets ``grid_size`` for learned positions).
        image_size: expected frame height and width.
        tubelet: ``(tt, th, tw)``, tubelet extent in frames and pixels.
        channels: input channels.
        norm_targets: normalize each target tubelet.
        input_key: the batch field holding the clips ``[B, C, T, H, W]``.

    Raises:
        ValueError: If ``frames`` or ``image_size`` are not multiples of the tubelet's extent.
    """

    pos_axes = 3
    #: frames shown side by side by `render` and `preview`
    render_frames = 4

    def __init__(self, dim: int, frames: int = 16, image_size: int = 224, tubelet: Sequence[int] = (2, 16, 16),
                 channels: int = 3, norm_targets: bool = True, input_key: str = "video") -> None:
        super().__init__()
        self.tubelet = _tubelet_arg(tubelet)
        tt, th, tw = self.tubelet
        if frames < 1 or image_size < 1:
            raise ValueError(f"frames and image_size must be positive, got frames={frames}, image_size={image_size}")
        _check_divisible((frames, image_size, image_size), self.tubelet)
        self.dim, self.frames, self.image_size, self.channels = dim, frames, image_size, channels
        self.norm_targets, self.input_key = norm_targets, input_key
        self.make_targets = True  # the trainer turns it off when no objective of the stage reads targets
        self.grid_size = (frames // tt, image_size // th, image_size // tw)
        self.target_dim = tt * th * tw * channels
        self.proj = nn.Conv3d(channels, dim, kernel_size=self.tubelet, stride=self.tubelet)

    def forward(self, video: Tensor) -> Tokens:
        if video.dim() != 5 or video.shape[1] != self.channels:
            raise ValueError(f"video tokenizer expects [B, {self.channels}, T, H, W] clips in batch[{self.input_key!r}], "
                             f"got shape {tuple(video.shape)}")
        _check_divisible(video.shape[2:], self.tubelet)
        x = self.proj(video).flatten(2).transpose(1, 2)  # [B, N, D], (t, h, w) row-major
        grid = tuple(s // p for s, p in zip(video.shape[2:], self.tubelet))
        pos = grid_positions(grid, x.shape[0], x.device)
        return Tokens(x=x, pos=pos, grid=grid, targets=self.targets(video) if self.make_targets else None,
                      modality="video")

    def targets(self, video: Tensor) -> Tensor:
        """Per-tubelet pixels ``[B, N, target_dim]``, normalized per tubelet if ``norm_targets``."""
        t = tubeletify(video.float(), self.tubelet)
        return normalize_per_token(t) if self.norm_targets else t

    def render(self, video: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """Map per-token targets (``[B, N, P]``, e.g. a reconstruction) back to frames for viewing.

        Normalized targets are de-normalized with the true tubelets' statistics; tokens where
        ``keep [B, N]`` is False are drawn grey.

        Returns:
            ``[B, C, H, W*k]``: ``k = min(render_frames, T)`` evenly spaced frames side by side.
        """
        true = tubeletify(video.float(), self.tubelet)
        if targets.shape != true.shape:
            raise ValueError(f"render expects targets of shape {tuple(true.shape)} for this video, got {tuple(targets.shape)}")
        targets = targets_for_viewing(targets, true, keep, self.norm_targets)
        grid = tuple(s // p for s, p in zip(video.shape[2:], self.tubelet))
        return frame_strip(untubeletify(targets, self.tubelet, grid, self.channels), self.render_frames)

    def preview(self, video: Tensor) -> Tensor:
        """The raw clips as `render` lays them out: ``[B, C, H, W*k]``."""
        return frame_strip(video.float(), self.render_frames)
