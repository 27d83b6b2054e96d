"""Image transforms for one sample ``[C, H, W]``: torch ops only, every random draw from the
generator passed in, so an augmentation is reproducible from its seed (exact resume)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.args import float_arg, int_arg, range_arg
from ...core.errors import DataError

__all__ = ["RandomResizedCrop", "RandomHorizontalFlip", "Resize", "Normalize", "RandomTranslate"]

# --------------------------------------------------------------------------------------------
# argument checks


def _check_image(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{who} expects one image tensor [C, H, W], got {shape}")
    if not x.is_floating_point():
        raise DataError(f"{who} expects a floating-point tensor, got {x.dtype}")


def resize_image(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize of one ``[C, H, W]`` image (antialiased, so shrinking does not alias)."""
    if x.shape[-2:] == (height, width):
        return x.clone()
    out = F.interpolate(
        x.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return out.squeeze(0)


# --------------------------------------------------------------------------------------------
# transforms


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize it to ``size x size``.

    Follows the usual Inception-style sampling: up to 10 tries draw an area share from ``scale``
    and a log-uniform aspect ratio from ``ratio``; if no try fits, a central crop is used.

    Args:
        size: Output side in pixels.
        scale: ``[low, high]`` share of the image area to crop, within (0, 1].
        ratio: ``[low, high]`` width/height aspect ratio range, positive.
    """

    moves_geometry = True  # a scene's calibration would no longer describe the output

    _TRIES = 10

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = int_arg("size", size, 1)
        self.scale = range_arg("scale", scale)
        if not 0.0 < self.scale[0] or self.scale[1] > 1.0:
            raise DataError(f"scale must lie within (0, 1], got {list(scale)}")
        self.ratio = range_arg("ratio", ratio)
        if self.ratio[0] <= 0.0:
            raise DataError(f"ratio must be positive, got {list(ratio)}")

    def _box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, ...]:
        # draw every try at once: the generator advances by the same amount whatever happens
        u = torch.rand(self._TRIES, 4, generator=generator, dtype=torch.float64)
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for a, r, ui, uj in u.tolist():
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * a)
            aspect = math.exp(log_lo + (log_hi - log_lo) * r)
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = min(int(ui * (height - h + 1)), height - h)
                j = min(int(uj * (width - w + 1)), width - w)
                return i, j, h, w
        # fallback: the largest central crop whose aspect ratio is within range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop and resize one image.

        Args:
            x: Image ``[C, H, W]``, floating point.
            generator: Source of all randomness; ``None`` uses torch's global generator.

        Returns:
            Image ``[C, size, size]``.
        """
        _check_image(x, "RandomResizedCrop")
        i, j, h, w = self._box(x.shape[-2], x.shape[-1], generator)
        return resize_image(x[:, i : i + h, j : j + w], self.size, self.size)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={list(self.scale)}, "
            f"ratio={list(self.ratio)})"
        )


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``.

    Args:
        p: Flip probability, in [0, 1].
    """

    moves_geometry = True  # a scene's calibration would no longer describe the output

    def __init__(self, p: float = 0.5) -> None:
        self.p = float_arg("p", p)
        if not 0.0 <= self.p <= 1.0:
            raise DataError(f"p must be in [0, 1], got {p}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Maybe flip one image ``[C, H, W]``; ``generator`` supplies the coin."""
        _check_image(x, "RandomHorizontalFlip")
        # always draw, so the generator advances the same way whatever p is
        if torch.rand(1, generator=generator).item() < self.p:
            return torch.flip(x, dims=[-1])
        return x.clone()

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize to a square ``size x size`` (bilinear, antialiased); aspect ratio is not kept.

    Args:
        size: Output side in pixels.
    """

    moves_geometry = True  # a scene's calibration would no longer describe the output

    def __init__(self, size: int) -> None:
        self.size = int_arg("size", size, 1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Resize one image ``[C, H, W]``; ``generator`` is accepted for a uniform interface."""
        _check_image(x, "Resize")
        return resize_image(x, self.size, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class Normalize:
    """Per-channel ``(x - mean) / std``.

    Args:
        mean: One value per channel, or a single value for all channels.
        std: Same length as ``mean``; every value positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if isinstance(mean, numbers.Real):
            mean = [mean]
        if isinstance(std, numbers.Real):
            std = [std]
        self.mean = [float_arg(f"mean[{i}]", m) for i, m in enumerate(mean)]
        self.std = [float_arg(f"std[{i}]", s) for i, s in enumerate(std)]
        if not self.mean or len(self.mean) != len(self.std):
            raise DataError(
                f"mean and std must be non-empty and of equal length, got {len(self.mean)} and "
                f"{len(self.std)}"
            )
        if any(s <= 0.0 for s in self.std):
            raise DataError(f"std values must be positive, got {self.std}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalize one image ``[C, H, W]``; ``generator`` is accepted for a uniform interface."""
        _check_image(x, "Normalize")
        if len(self.mean) not in (1, x.shape[0]):
            raise DataError(
                f"Normalize has {len(self.mean)} channel statistics but the image has "
                f"{x.shape[0]} channels"
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomTranslate:
    """Shift the image by a random whole number of pixels in each direction, filling with zeros.

    Suited to digits, whose background is zero; the shift per axis is uniform in
    ``[-max_shift, max_shift]``.

    Args:
        max_shift: Largest shift in pixels, >= 0.
    """

    moves_geometry = True  # a scene's calibration would no longer describe the output

    def __init__(self, max_shift: int) -> None:
        self.max_shift = int_arg("max_shift", max_shift, 0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Translate one image ``[C, H, W]``; ``generator`` supplies the shifts."""
        _check_image(x, "RandomTranslate")
        m = self.max_shift
        dy, dx = torch.randint(-m, m + 1, (2,), generator=generator).tolist()
        height, width = x.shape[-2:]
        out = torch.zeros_like(x)
        if abs(dy) >= height or abs(dx) >= width:
            return out  # shifted entirely out of frame
        out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = x[
            :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
        return out

    def __repr__(self) -> str:
        return f"RandomTranslate(max_shift={self.max_shift})"
