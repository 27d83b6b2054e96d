"""Point-set ops the lidar tokenizers share: farthest point sampling, kNN grouping, Chamfer distance.

All ops work on a whole zero-padded batch ``[B, N, ...]`` at once (``padding [B, N]``, True = pad,
as `anymodal.core.data.collate` makes it); none loops over points or groups in Python. Ideas from
Point-MAE (Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning", 2022).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import any_true

__all__ = ["bird_eye_view", "farthest_point_sample", "knn_group", "chamfer_distance", "gather_points", "check_points", "CHAMFER_LOSSES",
           "FPS_KERNELS"]

# a tokenizer's `loss` option -> chamfer_distance's kind
CHAMFER_LOSSES = {"chamfer_l2": "l2", "chamfer_l1": "l1"}
# farthest_point_sample's implementations: a loop of tensor ops, or one Triton kernel (fps_kernel.py)
FPS_KERNELS = ("torch", "triton")

#: FPS finds its argmax in two levels (block maxima, then within the block): on CPU ``amax`` is
#: vectorized and ``argmax`` is not, so this is several times faster than one ``argmax`` per step.
_FPS_BLOCK = 256
#: brute-force kNN handles at most this many centre-point coordinate differences at a time
_KNN_CHUNK = 1 << 24
#: clouds with more points than this use the pruned kNN; block size and blocks taken per centre
_KNN_BLOCKED_MIN = 8192
_KNN_BLOCK = 32
_KNN_BLOCKS = 32


def check_points(points: Tensor, padding: Optional[Tensor], who: str, min_channels: int = 3) -> None:
    """Raise ValueError unless ``points`` is ``[B, N, C >= min_channels]`` and ``padding`` is ``[B, N]`` bool."""
    if points.dim() != 3 or points.shape[-1] < min_channels:
        raise ValueError(f"{who} expects points [B, N, C] with C >= {min_channels} (x, y, z first), "
                         f"got shape {tuple(points.shape)}")
    if padding is not None and (padding.dtype != torch.bool or tuple(padding.shape) != tuple(points.shape[:2])):
        raise ValueError(f"{who} expects padding [B, N] = {tuple(points.shape[:2])} bool, "
                         f"got shape {tuple(padding.shape)} {padding.dtype}")


def gather_points(points: Tensor, index: Tensor) -> Tensor:
    """``points [B, N, C]`` at ``index [B, ...]`` -> ``[B, ..., C]``."""
    b = points.shape[0]
    flat = index.reshape(b, -1)
    out = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*index.shape, points.shape[-1])


def farthest_point_sample(xyz: Tensor, num: int, padding: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None, kernel: str = "torch") -> Tensor:
    """Greedy farthest point sampling: ``xyz [B, N, 3]`` -> indices ``[B, num]`` (long).

    Each step takes the point farthest (Euclidean) from those already taken; ties go to the lowest
    index. The first point is the first non-padding point of each cloud, or, with ``generator``, a
    uniformly random non-padding point. Padding is never taken. Points already taken rank below
    untaken ones at distance 0, so a cloud with at least ``num`` valid points gives distinct
    indices even when it has duplicate points. A cloud with only ``n < num`` valid points gives
    its ``n`` FPS picks repeated cyclically (pick ``j`` is pick ``j mod n``).

    Distances are float32 and computed per coordinate, so the order is exact up to float32
    rounding. The loop over the ``num`` picks is inherent to FPS. ``kernel="torch"`` runs each
    step as a fixed handful of in-place tensor ops over the batch; ``kernel="triton"`` runs all
    picks in one Triton kernel (`fps_kernel`: on a GPU the loop's time is kernel launches).

    Raises:
        ValueError: On a wrong shape, ``num < 1``, a cloud with no valid point, or an unknown kernel.
    """
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample expects xyz [B, N, 3], got shape {tuple(xyz.shape)}")
    if num < 1:
        raise ValueError(f"farthest_point_sample needs num >= 1, got {num}")
    if kernel not in FPS_KERNELS:
        raise ValueError(f"farthest_point_sample kernel must be one of {FPS_KERNELS}, got {kernel!r}")
    b, n, _ = xyz.shape
    device = xyz.device
    valid = torch.ones(b, n, dtype=torch.bool, device=device) if padding is None else ~padding
    n_valid = valid.sum(-1)
    if n == 0 or (not torch.compiler.is_exporting() and bool((n_valid == 0).any())):
        raise ValueError("farthest_point_sample got a cloud with no valid points")
    if generator is None:
        start = valid.byte().argmax(-1)  # first valid point
    else:
        noise = torch.rand(b, n, generator=generator, device=device)
        start = noise.masked_fill(~valid, -1.0).argmax(-1)

    coords = xyz.detach().to(torch.float32).permute(2, 0, 1)  # [3, B, N]; each kernel pads it into one row per axis
    # running distance to the taken set; -1 marks padding (never the max), -0.5 marks taken points
    dist = torch.full((b, n), float("inf"), device=device).masked_fill_(~valid, -1.0)
    if kernel == "triton":
        from .fps_kernel import fps_triton

        picks = fps_triton(coords, dist, start, num)
    else:
        picks = _fps_loop(coords, dist, start, num)
    if any_true(n_valid < num):
        j = torch.arange(num, device=device).expand(b, -1)
        picks = picks.gather(1, torch.where(j < n_valid[:, None], j, j % n_valid[:, None]))
    return picks


def _fps_loop(coords: Tensor, dist: Tensor, start: Tensor, num: int) -> Tensor:
    """`farthest_point_sample`'s picks, one step of tensor ops per pick."""
    _, b, n = coords.shape
    blocks = -(-n // _FPS_BLOCK)
    width = blocks * _FPS_BLOCK
    coords = torch.nn.functional.pad(coords, (0, width - n)).contiguous()  # one contiguous row per axis
    dist = torch.nn.functional.pad(dist, (0, width - n), value=-1.0)
    d = torch.empty(b, width, device=coords.device)
    diff = torch.empty(b, width, device=coords.device)
    rows = torch.arange(b, device=coords.device)
    picks = torch.empty(b, num, dtype=torch.long, device=coords.device)
    far = start.unsqueeze(-1)  # [B, 1]
    blocked = dist.view(b, blocks, _FPS_BLOCK)
    for i in range(num):
        picks[:, i] = far[:, 0]
        centre = coords.gather(2, far.unsqueeze(0).expand(3, -1, -1))  # [3, B, 1]
        torch.sub(coords[0], centre[0], out=diff)
        torch.mul(diff, diff, out=d)
        torch.sub(coords[1], centre[1], out=diff)
        d.addcmul_(diff, diff)
        torch.sub(coords[2], centre[2], out=diff)
        d.addcmul_(diff, diff)
        torch.minimum(dist, d, out=dist)
        dist.scatter_(1, far, -0.5)
        block = blocked.amax(-1).argmax(-1)  # [B]
        far = (block * _FPS_BLOCK + blocked[rows, block].argmax(-1)).unsqueeze(-1)
    return picks


def knn_group(xyz: Tensor, centres: Tensor, k: int, padding: Optional[Tensor] = None) -> Tensor:
    """Indices ``[B, G, k]`` of the ``k`` points of ``xyz [B, N, 3]`` nearest each centre ``[B, G, 3]``.

    Nearest first; padding is never returned. Where a cloud has fewer than ``k`` valid points
    the nearest one fills the remaining slots. The result is exact (up to float32 rounding and
    the order of equal distances) however it is computed: small clouds by brute force, large ones
    (lidar sweeps) by `_knn_blocked`, which prunes with bounding boxes and checks its answer.

    Raises:
        ValueError: On wrong shapes or ``k < 1``.
    """
    if xyz.dim() != 3 or xyz.shape[-1] != 3 or centres.dim() != 3 or centres.shape[-1] != 3 \
            or centres.shape[0] != xyz.shape[0]:
        raise ValueError(f"knn_group expects xyz [B, N, 3] and centres [B, G, 3], got shapes "
                         f"{tuple(xyz.shape)} and {tuple(centres.shape)}")
    if k < 1:
        raise ValueError(f"knn_group needs k >= 1, got {k}")
    p = xyz.detach().to(torch.float32)
    c = centres.detach().to(torch.float32)
    n = p.shape[1]
    kk = min(k, n)
    if n > _KNN_BLOCKED_MIN:
        vals, idx = _knn_blocked(p, c, kk, padding)
    else:
        vals, idx = _knn_brute(p, c, kk, padding)
    idx = torch.where(torch.isinf(vals), idx[..., :1], idx)
    if kk < k:
        idx = torch.cat([idx, idx[..., :1].expand(-1, -1, k - kk)], -1)
    return idx


def _sq_dist(points: Tensor, centres: Tensor) -> Tensor:
    """Squared distances ``[B, G, M]`` from ``centres [B, G, 3]`` to per-centre ``points [B, G, M, 3]``."""
    return (points - centres.unsqueeze(-2)).pow(2).sum(-1)


def _knn_brute(p: Tensor, c: Tensor, k: int, padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Every centre against every point, in chunks of centres (bounded memory); ``(dist, idx)``."""
    b, n, _ = p.shape
    # an exported graph takes every centre at once: a chunk size from the shapes would fix them
    step = c.shape[1] if torch.compiler.is_exporting() else max(1, _KNN_CHUNK // max(1, b * n * 3))
    vals, idxs = [], []
    for s in range(0, c.shape[1], step):
        d = (p.unsqueeze(1) - c[:, s:s + step].unsqueeze(2)).pow(2).sum(-1)  # [B, g, N]
        if padding is not None:
            d = d.masked_fill(padding.unsqueeze(1), float("inf"))
        v, i = d.topk(k, dim=-1, largest=False, sorted=True)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals, 1), torch.cat(idxs, 1)


def _morton_order(p: Tensor, valid: Tensor) -> Tensor:
    """Permutation ``[B, N]`` sorting each cloud along a Z-order curve (10 bits per axis over its
    valid points' bounding box), padding last, so consecutive points are spatially close."""
    big = torch.finfo(p.dtype).max
    lo = p.masked_fill(~valid.unsqueeze(-1), big).amin(1, keepdim=True)
    hi = p.masked_fill(~valid.unsqueeze(-1), -big).amax(1, keepdim=True)
    q = ((p - lo) / (hi - lo).clamp_min(1e-12) * 1023).clamp(0, 1023).to(torch.int64)
    q = (q | (q << 16)) & 0x030000FF  # spread 10 bits to every third bit
    q = (q | (q << 8)) & 0x0300F00F
    q = (q | (q << 4)) & 0x030C30C3
    q = (q | (q << 2)) & 0x09249249
    code = q[..., 0] | (q[..., 1] << 1) | (q[..., 2] << 2)
    code = code.masked_fill(~valid, 1 << 31)
    return code.sort(dim=1).indices


def _knn_blocked(p: Tensor, c: Tensor, k: int, padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact kNN for large clouds without computing all ``G x N`` distances.

    Points are put in Z-order and cut into blocks of `_KNN_BLOCK`; each block gets a bounding box.
    Each centre ranks the points of the blocks whose boxes are nearest. That answer is exact when
    its k-th distance is within the distance to the nearest box not taken (no point outside can
    be closer); centres where it is not (outliers far from everything) retry with more blocks,
    and the last few fall back to brute force.
    """
    b, n, _ = p.shape
    g = c.shape[1]
    valid = torch.ones(b, n, dtype=torch.bool, device=p.device) if padding is None else ~padding
    order = _morton_order(p, valid)
    blocks = -(-n // _KNN_BLOCK)
    width = blocks * _KNN_BLOCK
    order = torch.nn.functional.pad(order, (0, width - n))  # tail slots repeat index 0, marked invalid
    sp = gather_points(p, order)  # [B, W, 3]
    sv = valid.gather(1, order)
    sv[:, n:] = False
    big = torch.finfo(p.dtype).max
    boxed = sp.view(b, blocks, _KNN_BLOCK, 3)
    bv = sv.view(b, blocks, _KNN_BLOCK, 1)
    box_lo = boxed.masked_fill(~bv, big).amin(2)  # [B, nb, 3]
    box_hi = boxed.masked_fill(~bv, -big).amax(2)
    empty = ~sv.view(b, blocks, _KNN_BLOCK).any(-1)
    mid = ((box_lo + box_hi) / 2).permute(2, 0, 1).unsqueeze(2)  # [3, B, 1, nb]: one row per axis
    half = ((box_hi - box_lo) / 2).permute(2, 0, 1).unsqueeze(2)
    cq = c.permute(2, 0, 1).unsqueeze(-1)  # [3, B, G, 1]
    # squared distance from each centre to each box, 0 inside: sum over axes of relu(|c - mid| - half)^2
    box_d = torch.zeros(b, g, blocks, device=p.device)
    for axis in range(3):
        gap = (cq[axis] - mid[axis]).abs_().sub_(half[axis]).clamp_min_(0)
        box_d.addcmul_(gap, gap)
    box_d = box_d.masked_fill_(empty.unsqueeze(1), float("inf")).view(b * g, blocks)
    flat = [sp[..., axis].reshape(-1) for axis in range(3)]  # sorted coordinates, [B * W] each
    flat_valid = sv.reshape(-1)
    flat_order = order.reshape(-1)
    queries = c.reshape(b * g, 3)
    base = torch.arange(b, device=p.device).repeat_interleave(g) * width  # each query's cloud offset
    lanes = torch.arange(_KNN_BLOCK, device=p.device)
    vals = torch.empty(b * g, k, device=p.device)
    idx = torch.empty(b * g, k, dtype=torch.long, device=p.device)
    todo = None  # None: every query
    take = _KNN_BLOCKS
    while todo is None or todo.numel():
        if take >= blocks:  # what is left: brute force, cloud by cloud
            rows = torch.div(base[todo], width, rounding_mode="floor")
            for row in rows.unique().tolist():
                sel = todo[rows == row]
                pad = None if padding is None else padding[row:row + 1]
                v, i = _knn_brute(p[row:row + 1], queries[sel][None], k, pad)
                vals[sel], idx[sel] = v[0], i[0]
            break
        bd, q, off = (box_d, queries, base) if todo is None else (box_d[todo], queries[todo], base[todo])
        near_d, near = bd.topk(take + 1, dim=-1, largest=False, sorted=True)
        cand = (near[:, :take, None] * _KNN_BLOCK + lanes).flatten(1) + off[:, None]  # [Q, M] flat slots
        d = (flat[0][cand] - q[:, :1]).square_()
        for axis in (1, 2):
            diff = flat[axis][cand] - q[:, axis:axis + 1]
            d.addcmul_(diff, diff)
        d.masked_fill_(~flat_valid[cand], float("inf"))
        v, pick = d.topk(k, dim=-1, largest=False, sorted=True)
        ok = v[:, -1] <= near_d[:, take]
        slots = flat_order[cand.gather(1, pick)]
        if todo is None:
            vals, idx = v.clone(), slots
            todo = torch.arange(b * g, device=p.device)[~ok]
        else:
            done = todo[ok]
            vals[done], idx[done] = v[ok], slots[ok]
            todo = todo[~ok]
        take *= 8
    return vals.view(b, g, k), idx.view(b, g, k)


def chamfer_distance(pred: Tensor, target: Tensor, target_valid: Optional[Tensor] = None,
                     kind: str = "l2") -> Tensor:
    """Chamfer distance between point groups ``pred [..., K, 3]`` and ``target [..., K', 3]``.

    Per group: the mean over predicted points of the distance to the nearest valid target point,
    plus the mean over valid target points of the distance to the nearest predicted point; the
    result is the mean over groups that have at least one valid target (0 when none has).
    ``kind='l2'`` uses squared Euclidean distances (Point-MAE's CD-L2); ``kind='l1'`` uses
    Euclidean distances (Point-MAE's CD-L1, which also halves the sum; here both kinds are the
    plain sum, so the two terms weigh alike). ``target_valid [..., K']`` marks real target slots.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"chamfer kind must be 'l1' or 'l2', got {kind!r}")
    if pred.shape[-1] != 3 or target.shape[-1] != 3 or pred.shape[:-2] != target.shape[:-2]:
        raise ValueError(f"chamfer_distance expects pred [..., K, 3] and target [..., K', 3] with the same "
                         f"leading dims, got {tuple(pred.shape)} and {tuple(target.shape)}")
    d = (pred.unsqueeze(-2) - target.unsqueeze(-3)).pow(2).sum(-1)  # [..., K, K']
    if target_valid is None:
        target_valid = torch.ones(target.shape[:-1], dtype=torch.bool, device=target.device)
    d = d.masked_fill(~target_valid.unsqueeze(-2), float("inf"))
    to_target = d.amin(-1)  # [..., K]
    to_pred = d.amin(-2)  # [..., K']
    has = target_valid.any(-1)
    to_target = torch.where(has.unsqueeze(-1), to_target, torch.zeros_like(to_target))
    to_pred = torch.where(target_valid, to_pred, torch.zeros_like(to_pred))
    if kind == "l1":  # clamp: sqrt's gradient at an exact match would be infinite
        to_target, to_pred = to_target.clamp_min(1e-12).sqrt(), to_pred.clamp_min(1e-12).sqrt()
        to_pred = to_pred * target_valid
        to_target = to_target * has.unsqueeze(-1)
    count = target_valid.sum(-1).clamp_min(1)
    per_group = to_target.mean(-1) + to_pred.sum(-1) / count
    groups = has.sum().clamp_min(1)
    return (per_group * has).sum() / groups


def bird_eye_view(xyz: Tensor, lo: Tensor, hi: Tensor, size: int = 64) -> Tensor:
    """Rasterize ``xyz [B, P, 3]`` (NaN rows skipped) onto ``size x size`` pixels spanning x-y corners
    ``lo`` to ``hi`` (``[B, 1, 2]``, or broadcastable), x to the right and y up: ``[B, 1, size, size]``
    of 0 and 1. Points outside the corners are left out."""
    b = xyz.shape[0]
    cell = ((xyz[..., :2] - lo) / (hi - lo).clamp_min(1e-6) * (size - 1)).round()
    ok = ~cell.isnan().any(-1) & (cell >= 0).all(-1) & (cell <= size - 1).all(-1)
    cell = cell.nan_to_num(0).long()
    flat = torch.arange(b, device=xyz.device)[:, None] * size * size + (size - 1 - cell[..., 1]) * size + cell[..., 0]
    image = torch.zeros(b * size * size, device=xyz.device)
    image[flat[ok]] = 1.0
    return image.view(b, 1, size, size)
