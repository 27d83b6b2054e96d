"""Point patches as tokens (Point-MAE: Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", 2022).

FPS picks ``G`` centres, each centre's ``K`` nearest points form a group in coordinates relative
to the centre, and a mini-PointNet (shared per-point MLP, max-pool, the pooled feature joined
back to every point, a second MLP, max-pool) embeds each group into one token. Positions are the
centres' continuous xyz, so use the ``mlp`` (or ``sincos``) positional encoding. Targets are the
group's relative points; masked reconstruction compares them as sets (Chamfer distance).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.tokens import Tokens
from .common import any_true
from .point_ops import (CHAMFER_LOSSES, FPS_KERNELS, bird_eye_view, chamfer_distance, check_points, farthest_point_sample,
                        gather_points, knn_group)

__all__ = ["PointPatchTokenizer"]



class PointPatchTokenizer(nn.Module):
    """FPS + kNN point groups embedded by a mini-PointNet.

    Deterministic: FPS starts at each cloud's first valid point. LayerNorm (not Point-MAE's
    BatchNorm) keeps every cloud's tokens independent of the rest of the batch, so a padded batch
    tokenizes each cloud as it would alone. A cloud with fewer valid points than ``groups`` gets
    its FPS centres repeated; those repeated tokens are marked padding.

    Args:
        dim: encoder width.
        groups: ``G``, centres (tokens) per cloud.
        group_size: ``K``, points per group.
        channels: per-point features fed to the PointNet: relative xyz plus the input's next
            ``channels - 3`` columns (intensity, time, ...). Targets are xyz only.
        widths: the PointNet's hidden widths ``(first MLP hidden, first MLP out, second MLP hidden)``.
        loss: ``chamfer_l2`` or ``chamfer_l1`` (see `chamfer_distance`).
        input_key: the batch field holding the points ``[B, N, C]``.
        fps_kernel: ``torch`` (a few tensor ops per centre) or ``triton`` (all centres in one
            GPU kernel, `fps_kernel`; same picks, without a kernel launch per centre).
    """

    pos_axes = 3
    grid_size = None

    def __init__(self, dim: int, groups: int = 64, group_size: int = 32, channels: int = 3,
                 widths: Sequence[int] = (128, 256, 512), loss: str = "chamfer_l2", input_key: str = "points",
                 fps_kernel: str = "torch") -> None:
        super().__init__()
        if groups < 1 or group_size < 1 or channels < 3:
            raise ValueError(f"point_patch needs groups >= 1, group_size >= 1 and channels >= 3, got "
                             f"groups={groups}, group_size={group_size}, channels={channels}")
        if loss not in CHAMFER_LOSSES:
            raise ValueError(f"point_patch loss must be one of {sorted(CHAMFER_LOSSES)}, got {loss!r}")
        if fps_kernel not in FPS_KERNELS:
            raise ValueError(f"point_patch fps_kernel must be one of {FPS_KERNELS}, got {fps_kernel!r}")
        if len(widths) != 3:
            raise ValueError(f"point_patch widths must be three integers, got {widths!r}")
        h1, h2, h3 = (int(w) for w in widths)
        self.dim, self.groups, self.group_size, self.channels = dim, groups, group_size, channels
        self.loss, self.input_key, self.fps_kernel = loss, input_key, fps_kernel
        self.target_dim = group_size * 3
        self.first = nn.Sequential(nn.Linear(channels, h1), nn.LayerNorm(h1), nn.GELU(), nn.Linear(h1, h2))
        self.second = nn.Sequential(nn.Linear(2 * h2, h3), nn.LayerNorm(h3), nn.GELU(), nn.Linear(h3, dim))

    def forward(self, points: Tensor, padding: Optional[Tensor] = None) -> Tokens:
        check_points(points, padding, f"point_patch tokenizer (batch[{self.input_key!r}])", self.channels)
        xyz = points[..., :3].float()
        centre_idx = farthest_point_sample(xyz, self.groups, padding, kernel=self.fps_kernel)  # [B, G]
        centres = gather_points(xyz, centre_idx)  # [B, G, 3]
        neighbours = knn_group(xyz, centres, self.group_size, padding)  # [B, G, K]
        grouped = gather_points(points[..., :self.channels].float(), neighbours)  # [B, G, K, C]
        rel = grouped[..., :3] - centres.unsqueeze(-2)
        feats = torch.cat([rel, grouped[..., 3:]], -1).to(self.first[0].weight.dtype)
        h = self.first(feats)  # [B, G, K, h2]
        pooled = h.amax(-2, keepdim=True)
        x = self.second(torch.cat([pooled.expand_as(h), h], -1)).amax(-2)  # [B, G, dim]
        token_padding = None
        if padding is not None or points.shape[1] < self.groups:
            n_valid = points.shape[1] if padding is None else (~padding).sum(-1, keepdim=True)
            repeated = (torch.arange(self.groups, device=points.device) >= n_valid).expand(points.shape[0], -1)
            token_padding = repeated if any_true(repeated) else None
        return Tokens(x=x, pos=centres, padding=token_padding, targets=rel.flatten(2), modality="points")

    def preview(self, points: Tensor, size: int = 64) -> Tensor:
        """A bird's-eye view of each cloud: ``[B, 1, size, size]``, 1 where a point falls, x to the
        right and y up, over the cloud's own x-y extent."""
        xyz = points[..., :3].float()
        return bird_eye_view(xyz, *_extent(xyz), size)

    def render(self, points: Tensor, targets: Tensor, keep: Tensor, size: int = 64) -> Tensor:
        """The groups of ``targets [B, G, K*3]`` (offsets from their centres, e.g. a reconstruction)
        placed at the cloud's centres, those where ``keep [B, G]`` is True, as `preview` images."""
        xyz = points[..., :3].float()
        centres = gather_points(xyz, farthest_point_sample(xyz, self.groups, kernel=self.fps_kernel))  # as forward
        groups = centres.unsqueeze(-2) + targets.float().reshape(*targets.shape[:2], self.group_size, 3)
        far = torch.full_like(groups, float("nan"))  # groups not kept: drawn nowhere
        shown = torch.where(keep[..., None, None], groups, far).flatten(1, 2)
        return bird_eye_view(shown, *_extent(xyz), size)

    def reconstruction_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Chamfer distance between predicted and true groups, both ``[B, M, K*3]``."""
        k = self.group_size
        return chamfer_distance(pred.reshape(*pred.shape[:-1], k, 3), target.reshape(*target.shape[:-1], k, 3),
                                kind=CHAMFER_LOSSES[self.loss])


def _extent(xyz: Tensor) -> tuple[Tensor, Tensor]:
    """Each cloud's x-y corners, ``[B, 1, 2]`` each."""
    return xyz[..., :2].amin(1, keepdim=True), xyz[..., :2].amax(1, keepdim=True)
