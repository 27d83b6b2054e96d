"""Ragged inputs end to end: collate padding reaches the tokenizer, maskers and the encoder skip
padding, and masked reconstruction uses a tokenizer's own set distance when it has one."""

import torch
from torch import nn

from anymodal.core.backbone import Backbone
from anymodal.core.data import collate
from anymodal.core.encoder import Encoder
from anymodal.core.masking import RandomMasker
from anymodal.core.objective import Batch
from anymodal.core.posenc import build_posenc
from anymodal.core.tokens import Tokens
from anymodal.objectives.masked_pixel import MaskedPixel


class VectorSetTokenizer(nn.Module):
    """One token per set element; positions are the elements' first two values (continuous).
    Reconstruction targets are the elements themselves, compared as an unordered set per token
    pair (the smallest squared distance over the reversed and the given order)."""

    pos_axes = 2
    input_key = "points"

    def __init__(self, dim: int, channels: int = 3) -> None:
        super().__init__()
        self.target_dim = channels
        self.embed = nn.Linear(channels, dim)
        self.calls = []

    def forward(self, points, padding=None):
        self.calls.append(padding)
        return Tokens(x=self.embed(points), pos=points[..., :2], padding=padding, targets=points)

    def reconstruction_loss(self, pred, target):
        return torch.minimum((pred - target).pow(2).mean(-1), (pred.flip(-1) - target).pow(2).mean(-1)).mean()


def _student(dim=16):
    torch.manual_seed(0)
    return Backbone(VectorSetTokenizer(dim), Encoder(dim, 2, 2, build_posenc("mlp", dim, 2)))


def test_padding_reaches_the_tokenizer_and_padded_tokens_never_matter():
    student = _student().eval()
    clouds = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) for n in (9, 5, 7)]
    batch = collate([{"points": c} for c in clouds])
    tokens = student.tokenize(batch)
    assert torch.equal(student.tokenizer.calls[-1], batch["points_padding"])
    mask = RandomMasker(0.5)(tokens, torch.Generator().manual_seed(0))
    assert not tokens.padding.gather(1, mask.visible).any() and not tokens.padding.gather(1, mask.target).any()
    with torch.no_grad():
        pooled = student.embed(batch)
        for i, c in enumerate(clouds):  # each set alone, no padding, gives the same pooled feature
            alone = student.embed({"points": c[None]})
            torch.testing.assert_close(pooled[i], alone[0], rtol=1e-5, atol=1e-5)


def test_masked_reconstruction_uses_the_tokenizers_set_distance():
    student = _student()
    objective = MaskedPixel(16, student.tokenizer, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    batch = collate([{"points": torch.randn(n, 3, generator=torch.Generator().manual_seed(n))} for n in (8, 6)])
    tokens = student.tokenize(batch)
    g = torch.Generator().manual_seed(1)
    out = objective(Batch(batch, tokens, RandomMasker(0.5)(tokens, g), g), student)
    pred = objective.reconstruct(Batch(batch, tokens, RandomMasker(0.5)(tokens, torch.Generator().manual_seed(1)), g), student)
    mask = RandomMasker(0.5)(tokens, torch.Generator().manual_seed(1))
    target = tokens.targets.gather(1, mask.target[..., None].expand(-1, -1, 3))
    expected = student.tokenizer.reconstruction_loss(pred.float(), target)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, torch.nn.functional.mse_loss(pred.float(), target))
