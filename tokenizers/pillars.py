"""Bird's-eye-view pillars as tokens, for full lidar sweeps (PointPillars: Lang et al.,
"PointPillars: Fast Encoders for Object Detection from Point Clouds", 2019).

Points inside a configured range fall into vertical columns (pillars) on a BEV grid; each point is
decorated with its offsets from its pillar's mean and centre, passed through a shared linear layer
and max-pooled per pillar. One token per non-empty pillar, so the token count varies per sweep:
tokens are padded to the batch's largest count. Everything is index arithmetic plus
``scatter_add_`` / ``scatter_reduce``; there is no Python loop over points or pillars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.tokens import Tokens
from .point_ops import CHAMFER_LOSSES, bird_eye_view, chamfer_distance, check_points

__all__ = ["PillarTokenizer", "PillarAssignment", "assign_pillars", "scatter_pool"]

_POOL_CHUNK = 4096


@dataclass
class PillarAssignment:
    """Which pillar each kept point is in. Pillars are numbered in (cloud, row, col) order.

    Attributes:
        point: ``[P]`` flat index ``b * N + n`` of every in-range, non-padding point.
        pillar: ``[P]`` the pillar of each of those points.
        cloud, row, col: ``[S]`` each pillar's cloud and grid cell (row = y, col = x).
        slot: ``[S]`` each pillar's token index within its cloud.
        counts: ``[B]`` pillars per cloud.
    """

    point: Tensor
    pillar: Tensor
    cloud: Tensor
    row: Tensor
    col: Tensor
    slot: Tensor
    counts: Tensor

    @property
    def num_pillars(self) -> int:
        return self.cloud.numel()


def assign_pillars(xyz: Tensor, padding: Optional[Tensor], point_range: Sequence[float],
                   pillar_size: Sequence[float], grid: Sequence[int]) -> PillarAssignment:
    """Assign the points of ``xyz [B, N, 3]`` to BEV cells; points out of range or padding are dropped.

    ``point_range`` is ``(x_min, y_min, z_min, x_max, y_max, z_max)``, ``pillar_size`` ``(sx, sy)``,
    ``grid`` ``(ny, nx)``. A point is in cell ``(floor((y - y_min) / sy), floor((x - x_min) / sx))``.
    """
    b, n, _ = xyz.shape
    ny, nx = grid
    x_min, y_min, z_min, _, _, z_max = point_range
    col = torch.floor((xyz[..., 0] - x_min) / pillar_size[0]).clamp(-1, nx).long()
    row = torch.floor((xyz[..., 1] - y_min) / pillar_size[1]).clamp(-1, ny).long()
    z = xyz[..., 2]
    keep = (col >= 0) & (col < nx) & (row >= 0) & (row < ny) & (z >= z_min) & (z < z_max)
    if padding is not None:
        keep &= ~padding
    point = keep.flatten().nonzero().squeeze(1)
    cells = ny * nx
    cell = torch.div(point, n, rounding_mode="floor") * cells + row.flatten()[point] * nx + col.flatten()[point]
    occupied = torch.zeros(b * cells, dtype=torch.bool, device=xyz.device)
    occupied[cell] = True
    pillar = (occupied.cumsum(0) - 1)[cell]  # dense numbering in (cloud, row, col) order
    used = occupied.nonzero().squeeze(1)
    cloud = torch.div(used, cells, rounding_mode="floor")
    rc = used - cloud * cells
    counts = _count(cloud, b)
    slot = torch.arange(used.numel(), device=xyz.device) - (counts.cumsum(0) - counts)[cloud]
    return PillarAssignment(point, pillar, cloud, torch.div(rc, nx, rounding_mode="floor"), rc % nx, slot, counts)


def _count(index: Tensor, size: int) -> Tensor:
    """``torch.bincount(index, minlength=size)`` for indices below ``size``, in ops ONNX has."""
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


def scatter_pool(features: Tensor, pillar: Tensor, num: int, reduce: str = "amax") -> Tensor:
    """Pool per-point ``features [P, F]`` into ``[num, F]`` by ``pillar [P]``: ``amax`` or ``mean``.

    Every pillar must hold at least one point (as `assign_pillars` guarantees).
    """
    if reduce not in ("amax", "mean"):
        raise ValueError(f"scatter_pool reduce must be 'amax' or 'mean', got {reduce!r}")
    out = features.new_zeros(num, features.shape[-1])
    index = pillar.unsqueeze(-1).expand_as(features)
    return out.scatter_reduce(0, index, features, reduce=reduce, include_self=False)


def _linear_max_pool(feats: Tensor, weight: Tensor, pillar: Tensor, num: int) -> Tensor:
    """``scatter_pool(feats @ weight.T, pillar, num, "amax")``.

    Without autograd, chunks of `_POOL_CHUNK` points are pooled in place: each chunk's
    ``[chunk, hidden]`` activations stay in cache and no ``[P, hidden]`` tensor is allocated (on
    CPU that halves the time of a 120k-point sweep). With autograd, one scatter over all points:
    a chunked out-of-place pool would copy the whole ``[num, hidden]`` output per chunk, which
    grows with the square of the batch.
    """
    w = weight.t()
    if torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad):
        h = feats @ w
        out = h.new_full((num, h.shape[1]), float("-inf"))
        return out.scatter_reduce(0, pillar[:, None].expand_as(h), h, reduce="amax")
    w = w.contiguous()
    out = feats.new_full((num, w.shape[1]), float("-inf"))
    for start in range(0, feats.shape[0], _POOL_CHUNK):
        h = feats[start:start + _POOL_CHUNK] @ w
        out.scatter_reduce_(0, pillar[start:start + _POOL_CHUNK, None].expand_as(h), h, reduce="amax")
    return out


def _coordinate_hash(xyz: Tensor) -> Tensor:
    """A 31-bit hash of each point's float32 bits: a fixed pseudo-random rank that does not depend
    on where the point sits in the array (so padding and batching do not change it)."""
    bits = xyz.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    h = (bits[..., 0] * 73856093) ^ (bits[..., 1] * 19349663) ^ (bits[..., 2] * 83492791)
    return h & 0x7FFFFFFF


def _pair(v: Union[float, Sequence[float]], name: str) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return float(v), float(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be a number or (x, y), got {v!r}")
    return float(v[0]), float(v[1])


class PillarTokenizer(nn.Module):
    """One token per non-empty BEV pillar of a lidar sweep.

    Per point: x, y, z (scaled to the range), the next ``channels - 3`` input columns (intensity,
    time, ...), offsets from its pillar's mean (3) and from the pillar's centre in x and y (2):
    PointPillars' decoration, offsets in units of the pillar's half extent. A shared linear layer,
    a max-pool per pillar, then LayerNorm + ReLU and a projection to ``dim``. Positions are the pillars' integer cells ``(row, col)``, so ``sincos``
    and ``learned`` positional encodings work (``grid_size = (ny, nx)``).

    ``Tokens.source`` gives each input point's token (-1: out of range or padding), so per-point
    labels and camera projections map onto tokens.

    Targets: for each pillar, up to ``max_points`` of its points as ``(dx, dy, dz, valid)`` slots,
    flattened to ``max_points * 4``. ``dx, dy, dz`` are offsets from the pillar's centre in units
    of its half extent (each axis in [-1, 1), so height does not outweigh the footprint); empty
    slots are zero with ``valid = 0``. A pillar with more points keeps those that come first by
    a hash of their coordinates (deterministic, unbiased by scan order, independent of batching).

    The default 1.6 m pillars over the 102.4 m x 102.4 m range give a 64 x 64 grid: at most 4096
    tokens (a 120k-point sweep with ground
    returns everywhere fills nearly all of them), which a plain ViT can attend over (PointPillars'
    0.16 m suits a convolutional backbone, not global attention).

    Args:
        dim: encoder width.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres; points outside are dropped.
        pillar_size: pillar footprint in metres, one number or ``(x, y)``; must divide the range.
        max_points: target points kept per pillar.
        channels: input columns used (x, y, z plus ``channels - 3`` more); the input may have more.
        hidden: width of the per-point layer.
        loss: ``chamfer_l2`` or ``chamfer_l1`` over valid target slots.
        input_key: the batch field holding the points ``[B, N, C]``.
    """

    pos_axes = 2

    def __init__(self, dim: int, point_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
                 pillar_size: Union[float, Sequence[float]] = 1.6, max_points: int = 16, channels: int = 4,
                 hidden: int = 64, loss: str = "chamfer_l2", input_key: str = "points") -> None:
        super().__init__()
        if len(point_range) != 6:
            raise ValueError(f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {point_range!r}")
        self.point_range = tuple(float(v) for v in point_range)
        self.pillar_size = _pair(pillar_size, "pillar_size")
        x_min, y_min, z_min, x_max, y_max, z_max = self.point_range
        if not (x_max > x_min and y_max > y_min and z_max > z_min) or min(self.pillar_size) <= 0:
            raise ValueError(f"point_range {point_range!r} must have max > min on every axis and pillar_size "
                             f"{pillar_size!r} must be positive")
        extent = ((y_max - y_min) / self.pillar_size[1], (x_max - x_min) / self.pillar_size[0])
        if any(abs(e - round(e)) > 1e-4 for e in extent):
            raise ValueError(f"pillar_size {pillar_size!r} does not divide the range {point_range!r} into whole cells")
        if max_points < 1 or channels < 3:
            raise ValueError(f"pillar needs max_points >= 1 and channels >= 3, got {max_points} and {channels}")
        if loss not in CHAMFER_LOSSES:
            raise ValueError(f"pillar loss must be one of {sorted(CHAMFER_LOSSES)}, got {loss!r}")
        self.grid_size = (int(round(extent[0])), int(round(extent[1])))
        self.dim, self.max_points, self.channels = dim, max_points, channels
        self.loss, self.input_key = loss, input_key
        self.target_dim = max_points * 4
        self.make_targets = True  # the trainer turns it off when no objective of the stage reads targets
        self.point_linear = nn.Linear(channels + 5, hidden)  # its bias is added after pooling
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, dim)
        lo, hi = torch.tensor(self.point_range[:3]), torch.tensor(self.point_range[3:])
        self.register_buffer("range_mid", (lo + hi) / 2, persistent=False)
        self.register_buffer("range_scale", 2 / (hi - lo), persistent=False)

    def forward(self, points: Tensor, padding: Optional[Tensor] = None) -> Tokens:
        check_points(points, padding, f"pillar tokenizer (batch[{self.input_key!r}])", self.channels)
        b, n, _ = points.shape
        sx, sy = self.pillar_size
        x_min, y_min, z_min, _, _, z_max = self.point_range
        a = assign_pillars(points[..., :3].float(), padding, self.point_range, self.pillar_size, self.grid_size)
        s = a.num_pillars
        kept = points.reshape(b * n, -1).index_select(0, a.point)[:, :self.channels].float()  # [P, C]
        xyz = kept[:, :3]
        count = _count(a.pillar, s)
        mean = xyz.new_zeros(s, 3).scatter_add_(0, a.pillar[:, None].expand_as(xyz), xyz) / count.unsqueeze(-1)
        centre = torch.stack([x_min + (a.col + 0.5) * sx, y_min + (a.row + 0.5) * sy,
                              torch.full_like(mean[:, 0], (z_min + z_max) / 2)], -1).to(xyz.dtype)
        inv_half = xyz.new_tensor([2 / sx, 2 / sy, 2 / (z_max - z_min)])
        local = (xyz - centre.index_select(0, a.pillar)).mul_(inv_half)  # pillar units, [-1, 1) per axis
        to_mean = (xyz - mean.index_select(0, a.pillar)).mul_(inv_half)
        # x, y, z scaled to [-1, 1] over the range, so no input feature is tens of metres
        feats = torch.cat([(xyz - self.range_mid).mul_(self.range_scale), kept[:, 3:], to_mean, local[:, :2]], -1)
        # ReLU after the max-pool: max commutes with the (monotone) ReLU, and normalizing S pooled
        # vectors instead of P points keeps the per-point work to one matmul
        # the bias is added after pooling too (max(xW + b) = max(xW) + b), saving a pass over P points
        pooled = _linear_max_pool(feats.to(self.proj.weight.dtype), self.point_linear.weight, a.pillar, s)
        pooled = pooled + self.point_linear.bias
        pooled = self.proj(torch.relu(self.norm(pooled)))  # [S, dim]

        m = a.counts.max().clamp(min=1).item() if b else 1  # the most pillars in a sweep: the token count
        torch._check(m >= 1)  # tells torch.export the data-dependent count is a valid size
        flat = a.cloud * m + a.slot
        x = pooled.new_zeros(b * m, self.dim).index_copy_(0, flat, pooled).view(b, m, self.dim)
        pos = torch.zeros(b * m, 2, dtype=torch.long, device=points.device)
        pos = pos.index_copy_(0, flat, torch.stack([a.row, a.col], -1)).view(b, m, 2)
        token_padding = torch.ones(b * m, dtype=torch.bool, device=points.device).index_fill_(0, flat, False)
        targets = None
        if self.make_targets:
            targets = self._targets(local, xyz, a.pillar, count, s)
            targets = targets.new_zeros(b * m, self.target_dim).index_copy_(0, flat, targets).view(b, m, -1)
        # each input point's token (its pillar's slot), -1 for points out of range or padding
        source = torch.full((b * n,), -1, dtype=torch.long, device=points.device)
        source = source.index_copy_(0, a.point, a.slot.index_select(0, a.pillar)).view(b, n)
        return Tokens(x=x, pos=pos, padding=token_padding.view(b, m), grid=self.grid_size, targets=targets,
                      modality="points", source=source)

    def _targets(self, local: Tensor, xyz: Tensor, pillar: Tensor, count: Tensor, s: int) -> Tensor:
        """``[S, max_points * 4]``: each pillar's first ``max_points`` points by (pillar, hash)."""
        key = pillar * (1 << 31) + _coordinate_hash(xyz)
        order = key.argsort()
        sorted_pillar = pillar[order]
        rank = torch.arange(order.numel(), device=order.device) - (count.cumsum(0) - count)[sorted_pillar]
        keep = rank < self.max_points
        slots = local.new_zeros(s, self.max_points, 4)
        chosen = order[keep]
        slots[sorted_pillar[keep], rank[keep]] = torch.cat([local[chosen], local.new_ones(chosen.numel(), 1)], -1)
        return slots.flatten(1)

    def preview(self, points: Tensor, tokens: Tokens) -> Tensor:
        """A bird's-eye view of each sweep's points that a pillar holds (``tokens.source``), over the
        range, 2 pixels a pillar, x to the right and y up: ``[B, 1, 2 ny, 2 ny]``."""
        xyz = points[..., :3].float()
        held = torch.where((tokens.source >= 0).unsqueeze(-1), xyz, torch.full_like(xyz, float("nan")))
        return self._view(held)

    def render(self, points: Tensor, targets: Tensor, keep: Tensor, tokens: Tokens) -> Tensor:
        """The pillar slots of ``targets [B, M, max_points*4]`` (e.g. a reconstruction) placed in their
        pillars (``tokens.pos``), for the pillars where ``keep [B, M]`` is True, as `preview` images.
        Each pillar shows as many points as it truly holds (the validity channel of ``tokens.targets``:
        a prediction's own is not trained)."""
        k = self.max_points
        slots = targets.float().reshape(*targets.shape[:2], k, 4)
        valid = tokens.targets.reshape(*targets.shape[:2], k, 4)[..., 3] > 0.5
        x_min, y_min, z_min, _, _, z_max = self.point_range
        sx, sy = self.pillar_size
        row, col = tokens.pos[..., 0].float(), tokens.pos[..., 1].float()
        centre = torch.stack([x_min + (col + 0.5) * sx, y_min + (row + 0.5) * sy, torch.full_like(row, (z_min + z_max) / 2)], -1)
        half = slots.new_tensor([sx / 2, sy / 2, (z_max - z_min) / 2])
        xyz = centre.unsqueeze(-2) + slots[..., :3] * half
        drawn = valid & keep[..., None] & ~tokens.padding[..., None] if tokens.padding is not None else valid & keep[..., None]
        return self._view(torch.where(drawn.unsqueeze(-1), xyz, torch.full_like(xyz, float("nan"))).flatten(1, 2))

    def _view(self, xyz: Tensor) -> Tensor:
        x_min, y_min, _, x_max, y_max, _ = self.point_range
        lo, hi = xyz.new_tensor([x_min, y_min]), xyz.new_tensor([x_max, y_max])
        return bird_eye_view(xyz, lo, hi, 2 * max(self.grid_size))

    def reconstruction_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Chamfer distance between predicted slots and the valid target slots, both ``[B, M, max_points*4]``.

        The prediction's validity channel is ignored: every predicted point counts.
        """
        k = self.max_points
        pred = pred.reshape(*pred.shape[:-1], k, 4)
        target = target.reshape(*target.shape[:-1], k, 4)
        return chamfer_distance(pred[..., :3], target[..., :3], target[..., 3] > 0.5, kind=CHAMFER_LOSSES[self.loss])
