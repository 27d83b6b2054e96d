"""The peer the suite measures anymodal against: models assembled from timm's modules, the way the
MAE and UMT reference code builds them (timm `PatchEmbed` and `Block`, fixed sin-cos position
tables, per-sample random masking by argsort of noise, an un-shuffle gather in front of the
decoder, the loss over masked patches only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymodal.core.posenc import SinCosPosEnc
from anymodal.core.timm_compat import import_timm
from anymodal.tokenizers.common import grid_positions, normalize_per_token
from anymodal.tokenizers.image import patchify

__all__ = ["timm_vit", "TimmMae"]


def timm_vit(size: str, image_size: int, num_classes: int = 1000) -> nn.Module:
    """timm's own ViT (``vit_<size>_patch16_224`` at ``image_size``): the dense peer."""
    timm = import_timm()
    return timm.create_model(f"vit_{size}_patch16_224", img_size=image_size, num_classes=num_classes)


def _fixed_table(grid: int, dim: int) -> Tensor:
    """``[1, 1 + grid*grid, dim]`` sin-cos table with a zero row for the class token (MAE's layout)."""
    pos = grid_positions((grid, grid), 1, torch.device("cpu"))
    return torch.cat([torch.zeros(1, 1, dim), SinCosPosEnc(dim, 2)(pos)], dim=1)


class TimmMae(nn.Module):
    """MAE from timm blocks: encoder on the kept patches, decoder on all slots, loss on masked ones.

    Args:
        dim, depth, heads: encoder shape.
        image_size, patch: input geometry (3 channels).
        decoder_dim, decoder_depth, decoder_heads: decoder shape.
        ratio: fraction of patches masked.
    """

    def __init__(self, dim: int, depth: int, heads: int, image_size: int = 224, patch: int = 16,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, ratio: float = 0.75) -> None:
        super().__init__()
        import_timm()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.patch, self.ratio = patch, ratio
        grid = image_size // patch
        self.patch_embed = PatchEmbed(image_size, patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_table", _fixed_table(grid, dim), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_table", _fixed_table(grid, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images) + self.pos_table[:, 1:]
        b, n, d = x.shape
        kept = int(n * (1 - self.ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        x = x.gather(1, order[:, :kept, None].expand(-1, -1, d))
        masked = torch.ones(b, n, device=x.device)
        masked[:, :kept] = 0
        masked = masked.gather(1, restore)
        cls = (self.cls_token + self.pos_table[:, :1]).expand(b, -1, -1)
        x = self.norm(self.blocks(torch.cat([cls, x], dim=1)))
        x = self.decoder_embed(x)
        slots = torch.cat([x[:, 1:], self.mask_token.expand(b, n - kept, -1)], dim=1)
        slots = slots.gather(1, restore[..., None].expand(-1, -1, slots.shape[-1]))
        y = torch.cat([x[:, :1], slots], dim=1) + self.decoder_pos_table
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))[:, 1:]
        target = normalize_per_token(patchify(images.float(), self.patch))
        per_patch = F.mse_loss(pred.float(), target, reduction="none").mean(-1)
        return (per_patch * masked).sum() / masked.sum()
