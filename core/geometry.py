"""Calibrated sensors: rigid transforms, pinhole projection of points into cameras, and the link from
point-pooling tokens (lidar pillars) to the image patches their points land in. Batched over frames
and cameras; no loop over points. Cross-sensor objectives read these; nothing here knows a sensor's name.

Conventions: a sensor's extrinsics map its frame to the ego frame (``p_ego = R p + t`` as a 4x4);
cameras look along +z with x right and y down (OpenCV); a pixel ``(u, v)`` is (column, row) with
the image's top-left corner at (0, 0), so pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import DataError

__all__ = ["to_ego", "check_calibration", "Projection", "project_points", "points_to_patches", "TokenPatchLink",
           "link_tokens_to_patches", "pool_patch_features"]


def to_ego(points: Tensor, extrinsics: Tensor) -> Tensor:
    """Points ``[B, N, 3]`` in a sensor's frame -> the ego frame, by ``extrinsics [B, 4, 4]``."""
    return points @ extrinsics[:, :3, :3].transpose(1, 2) + extrinsics[:, None, :3, 3]


def check_calibration(intrinsics: Optional[Tensor], extrinsics: Tensor, frames: Optional[Sequence[str]] = None,
                      sensors: Optional[Sequence[str]] = None, tolerance: float = 1e-3) -> None:
    """Refuse calibrations that would project nonsense: ``intrinsics [B, C, 3, 3]`` (None for sensors
    that are not cameras) must be finite with positive focal lengths and last row ``[0, 0, 1]``;
    ``extrinsics [B, C, 4, 4]`` a rigid transform (orthonormal rotation, last row ``[0, 0, 0, 1]``).

    Raises:
        DataError: naming the first bad frame (``frames[b]``) and camera (``sensors[c]``).
    """
    e = extrinsics.double()
    eye = torch.eye(3, dtype=torch.float64, device=e.device)
    rotation = e[..., :3, :3]
    checks = {}
    if intrinsics is not None:
        k = intrinsics.double()
        checks = {
            "intrinsics are not finite": ~k.isfinite().flatten(-2).all(-1),
            "intrinsics need positive focal lengths fx, fy": ~((k[..., 0, 0] > 0) & (k[..., 1, 1] > 0)),
            "intrinsics' last row must be [0, 0, 1]": (k[..., 2, :] - k.new_tensor([0.0, 0.0, 1.0])).abs().amax(-1) > tolerance,
        }
    checks |= {
        "extrinsics are not finite": ~e.isfinite().flatten(-2).all(-1),
        "extrinsics' rotation is not orthonormal (singular or scaled)":
            (rotation @ rotation.transpose(-1, -2) - eye).abs().flatten(-2).amax(-1).nan_to_num(1.0) > tolerance,
        "extrinsics' last row must be [0, 0, 0, 1]":
            (e[..., 3, :] - e.new_tensor([0.0, 0.0, 0.0, 1.0])).abs().amax(-1) > tolerance,
    }
    bad = torch.stack(list(checks.values()))  # [checks, B, C]: one host sync when all is well
    if bool(bad.any()):
        which, b, c = (int(i) for i in bad.nonzero()[0])
        frame = frames[b] if frames is not None else f"batch item {b}"
        sensor = sensors[c] if sensors is not None else f"camera {c}"
        raise DataError(f"frame {frame}, {sensor}: {list(checks)[which]}")


@dataclass
class Projection:
    """Points projected into cameras.

    Attributes:
        uv: ``[B, C, N, 2]`` pixel coordinates (column, row).
        depth: ``[B, C, N]`` distance along each camera's optical axis.
        valid: ``[B, C, N]`` in front of the camera (beyond ``min_depth``), inside the image, not padding.
    """

    uv: Tensor
    depth: Tensor
    valid: Tensor


def project_points(xyz: Tensor, intrinsics: Tensor, extrinsics: Tensor, image_size: Sequence[int],
                   padding: Optional[Tensor] = None, min_depth: float = 0.1) -> Projection:
    """Project ego-frame points ``xyz [B, N, 3]`` into ``C`` cameras (``intrinsics [B, C, 3, 3]``,
    camera-to-ego ``extrinsics [B, C, 4, 4]``) of ``image_size (H, W)``; ``padding [B, N]`` is never valid.

    The extrinsic is inverted as a rigid transform (``R^T``, ``-R^T t``): exact, and no solve.
    """
    rotation, translation = extrinsics[..., :3, :3], extrinsics[..., :3, 3]
    # camera coordinates: R^T (p - t), for every camera at once: [B, C, N, 3]
    cam = (xyz[:, None] - translation[:, :, None]) @ rotation
    depth = cam[..., 2]
    pixel = cam @ intrinsics.transpose(-1, -2)
    uv = pixel[..., :2] / depth.clamp_min(min_depth).unsqueeze(-1)
    h, w = image_size
    valid = (depth > min_depth) & (uv[..., 0] >= 0) & (uv[..., 0] < w) & (uv[..., 1] >= 0) & (uv[..., 1] < h)
    if padding is not None:
        valid &= ~padding[:, None]
    return Projection(uv, depth, valid)


def points_to_patches(projection: Projection, patch_size: Sequence[int], image_size: Sequence[int]) -> Tensor:
    """``[B, C, N]`` the flat patch index (``row * W_patches + col``) each point lands in, -1 where not valid."""
    ph, pw = patch_size
    rows, cols = image_size[0] // ph, image_size[1] // pw
    row = torch.div(projection.uv[..., 1], ph, rounding_mode="floor").long()
    col = torch.div(projection.uv[..., 0], pw, rounding_mode="floor").long()
    # an image that is not a whole number of patches leaves strips at the bottom and right: no patch
    inside = projection.valid & (row < rows) & (col < cols)
    return torch.where(inside, row * cols + col, torch.full_like(row, -1))


@dataclass
class TokenPatchLink:
    """Which image patches each token's points land in, as a sparse list of ``L`` (token, patch) pairs.

    Attributes:
        cloud, token, camera, patch: ``[L]`` long, each pair's frame, token, camera and patch.
        weight: ``[L]`` the share of the token's projected points that land in that patch (a
            covered token's weights sum to 1).
        covered: ``[B, T]`` bool, tokens with at least one point inside some camera's image.
    """

    cloud: Tensor
    token: Tensor
    camera: Tensor
    patch: Tensor
    weight: Tensor
    covered: Tensor


def link_tokens_to_patches(source: Tensor, patch: Tensor, num_tokens: int, num_patches: int) -> TokenPatchLink:
    """Link tokens to patches from ``source [B, N]`` (each point's token, -1 none: `Tokens.source`) and
    ``patch [B, C, N]`` (each point's patch per camera, -1 none: `points_to_patches`)."""
    b, c, n = patch.shape
    hit = (patch >= 0) & (source[:, None] >= 0)  # [B, C, N]
    frame, camera, point = hit.nonzero(as_tuple=True)
    token = source[frame, point]
    # one key per (frame, token, camera, patch): unique pairs and how many points each holds
    key = ((frame * num_tokens + token) * c + camera) * num_patches + patch[frame, camera, point]
    pairs, count = torch.unique(key, return_counts=True)
    pair_patch = pairs % num_patches
    rest = torch.div(pairs, num_patches, rounding_mode="floor")
    pair_camera = rest % c
    flat_token = torch.div(rest, c, rounding_mode="floor")  # frame * T + token
    per_token = torch.zeros(b * num_tokens, dtype=count.dtype, device=count.device).index_add_(0, flat_token, count)
    weight = count.double() / per_token[flat_token].double()
    return TokenPatchLink(torch.div(flat_token, num_tokens, rounding_mode="floor"), flat_token % num_tokens, pair_camera,
                          pair_patch, weight, (per_token > 0).view(b, num_tokens))


def pool_patch_features(patch_features: Tensor, link: TokenPatchLink, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Each token's weighted mean of the patch features ``[B, C, P, D]`` its points land in:
    ``([B, T, D], covered [B, T])``; zeros where a token is not covered. Differentiable in the features."""
    b, c, p, d = patch_features.shape
    picked = patch_features.reshape(b * c * p, d).index_select(0, (link.cloud * c + link.camera) * p + link.patch)
    weighted = picked.mul_(link.weight.to(picked.dtype).unsqueeze(-1))  # in place: no second [L, D] buffer
    pooled = patch_features.new_zeros(b * num_tokens, d).index_add_(0, link.cloud * num_tokens + link.token, weighted)
    return pooled.view(b, num_tokens, d), link.covered
