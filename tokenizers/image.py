"""Image patches as tokens (ViT / MAE)."""

from __future__ import annotations

from torch import Tensor, nn

from ..core.tokens import Tokens
from .common import grid_positions, normalize_per_token, targets_for_viewing

__all__ = ["ImagePatchTokenizer", "patchify", "unpatchify"]


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, patch*patch*C]`` in row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: ``[B, N, patch*patch*C]`` -> ``[B, C, H, W]``."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


class ImagePatchTokenizer(nn.Module):
    """Non-overlapping square patches embedded by a strided convolution (timm's ``patch_embed.proj``).

    Targets are the patches' pixels, normalized per patch (MAE's ``norm_pix_loss``) when
    ``norm_targets`` is true.

    Args:
        dim: encoder width.
        image_size: expected input height and width (sets the grid of learned positions).
        patch_size: patch side in pixels.
        channels: input channels.
        norm_targets: normalize each target patch to zero mean and unit variance.
        input_key: the batch field holding the images ``[B, C, H, W]``.
    """

    pos_axes = 2

    def __init__(self, dim: int, image_size: int = 224, patch_size: int = 16, channels: int = 3,
                 norm_targets: bool = True, input_key: str = "image") -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.dim, self.image_size, self.patch_size, self.channels = dim, image_size, patch_size, channels
        self.norm_targets, self.input_key = norm_targets, input_key
        self.make_targets = True  # the trainer turns it off when no objective of the stage reads targets
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.target_dim = patch_size * patch_size * channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tokens:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"image tokenizer expects [B, {self.channels}, H, W] images in batch[{self.input_key!r}], "
                             f"got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {self.patch_size}")
        x = self.proj(images).flatten(2).transpose(1, 2)
        gh, gw = h // self.patch_size, w // self.patch_size
        pos = grid_positions((gh, gw), x.shape[0], x.device)
        return Tokens(x=x, pos=pos, grid=(gh, gw), targets=self.targets(images) if self.make_targets else None,
                      modality="image")

    def targets(self, images: Tensor) -> Tensor:
        t = patchify(images.float(), self.patch_size)
        return normalize_per_token(t) if self.norm_targets else t

    def render(self, images: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """Map per-token targets (``[B, N, P]``, e.g. a reconstruction) back to images for viewing.

        Normalized targets are de-normalized with the true patches' statistics; tokens where
        ``keep [B, N]`` is False are drawn grey.
        """
        targets = targets_for_viewing(targets, patchify(images.float(), self.patch_size), keep, self.norm_targets)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return unpatchify(targets, self.patch_size, grid, self.channels)
