"""Point-cloud transforms for one sample ``[N, C]`` (x, y, z first, z up): vectorized torch ops,
every random draw from the generator passed in, so an augmentation is reproducible from its seed.

Transforms that draw always draw the same amount, whatever the outcome, so a pipeline's later
transforms see the same generator state on every run.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ...core.args import float_arg, fraction_arg, int_arg, range_arg
from ...core.errors import DataError

__all__ = ["RangeCrop", "RotateZ", "RandomFlip", "PointDropout", "Jitter", "Subsample"]


def _check_points(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{who} expects one point cloud tensor [N, C >= 3] (x, y, z first), got {shape}")
    if not x.is_floating_point():
        raise DataError(f"{who} expects a floating-point tensor, got {x.dtype}")


def _random_subset(x: Tensor, keep: int, generator: torch.Generator | None) -> Tensor:
    """``keep`` random rows of ``x``, in their original order (a permutation is always drawn)."""
    chosen = torch.randperm(x.shape[0], generator=generator)[:keep].sort().values
    return x[chosen.to(x.device)]


class RangeCrop:
    """Keep the points inside a box ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (bounds included).

    A sample can end up empty; the collate pads it like any short cloud.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence) or len(bounds) != 6:
            raise DataError(f"bounds must be [x_min, y_min, z_min, x_max, y_max, z_max], got {bounds!r}")
        self.bounds = [float_arg(f"bounds[{i}]", b) for i, b in enumerate(bounds)]
        if any(lo > hi for lo, hi in zip(self.bounds[:3], self.bounds[3:])):
            raise DataError(f"bounds need every minimum <= its maximum, got {self.bounds}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "RangeCrop")
        low = torch.tensor(self.bounds[:3], dtype=x.dtype, device=x.device)
        high = torch.tensor(self.bounds[3:], dtype=x.dtype, device=x.device)
        return x[((x[:, :3] >= low) & (x[:, :3] <= high)).all(dim=1)]

    def __repr__(self) -> str:
        return f"RangeCrop(bounds={self.bounds})"


class RotateZ:
    """Rotate about the up (z) axis by an angle uniform in ``degrees`` (default: any angle)."""

    moves_geometry = True  # a scene's calibration would no longer describe the output

    def __init__(self, degrees: Sequence[float] = (-180.0, 180.0)) -> None:
        self.degrees = range_arg("degrees", degrees)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "RotateZ")
        low, high = self.degrees
        angle = math.radians(low + (high - low) * torch.rand(1, generator=generator).item())
        c, s = math.cos(angle), math.sin(angle)
        out = x.clone()
        out[:, 0] = c * x[:, 0] - s * x[:, 1]
        out[:, 1] = s * x[:, 0] + c * x[:, 1]
        return out

    def __repr__(self) -> str:
        return f"RotateZ(degrees={list(self.degrees)})"


class RandomFlip:
    """Mirror x (negate it) and/or y, each independently with probability ``p``."""

    moves_geometry = True  # a scene's calibration would no longer describe the output

    def __init__(self, x: bool = True, y: bool = True, p: float = 0.5) -> None:
        if not isinstance(x, bool) or not isinstance(y, bool) or not (x or y):
            raise DataError(f"x and y must be booleans, at least one true, got x={x!r}, y={y!r}")
        self.axes = [axis for axis, on in ((0, x), (1, y)) if on]
        self.p = fraction_arg("p", p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "RandomFlip")
        coins = torch.rand(2, generator=generator)
        out = x.clone()
        for axis in self.axes:
            if coins[axis].item() < self.p:
                out[:, axis] = -out[:, axis]
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(x={0 in self.axes}, y={1 in self.axes}, p={self.p})"


class PointDropout:
    """Drop a random share of the points, uniform in ``fraction`` (a number or ``[low, high]``).

    At least one point is kept.
    """

    def __init__(self, fraction: float | Sequence[float] = (0.0, 0.5)) -> None:
        low, high = (fraction, fraction) if not isinstance(fraction, Sequence) else range_arg("fraction", fraction)
        self.fraction = (fraction_arg("fraction", low, 0.999), fraction_arg("fraction", high, 0.999))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "PointDropout")
        low, high = self.fraction
        share = low + (high - low) * torch.rand(1, generator=generator).item()
        keep = max(1, round(x.shape[0] * (1.0 - share))) if x.shape[0] else 0
        return _random_subset(x, keep, generator)

    def __repr__(self) -> str:
        return f"PointDropout(fraction={list(self.fraction)})"


class Jitter:
    """Add Gaussian noise of std ``sigma`` to x, y, z, clipped to ``[-clip, clip]`` per coordinate."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        self.sigma, self.clip = float_arg("sigma", sigma), float_arg("clip", clip)
        if self.sigma < 0 or self.clip < 0:
            raise DataError(f"sigma and clip must be >= 0, got sigma={sigma}, clip={clip}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "Jitter")
        noise = torch.randn(x.shape[0], 3, generator=generator, dtype=x.dtype).to(x.device)
        out = x.clone()
        out[:, :3] += (noise * self.sigma).clamp_(-self.clip, self.clip)
        return out

    def __repr__(self) -> str:
        return f"Jitter(sigma={self.sigma}, clip={self.clip})"


class Subsample:
    """Keep a random subset of at most ``max_points`` points, in their original order."""

    def __init__(self, max_points: int) -> None:
        self.max_points = int_arg("max_points", max_points, 1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_points(x, "Subsample")
        return _random_subset(x, min(self.max_points, x.shape[0]), generator)

    def __repr__(self) -> str:
        return f"Subsample(max_points={self.max_points})"
