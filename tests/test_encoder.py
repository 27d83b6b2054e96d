"""The shared encoder: attention kernels agree, gathering equals removing tokens, padding is
invisible, drop-path, sizes, and exact parity with timm's ViT after loading its weights."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from anymodal.core.attention import Attention, Packed
from anymodal.core.backbone import Backbone
from anymodal.core.encoder import ENCODER_SIZES, Encoder
from anymodal.core.layers import DropPath
from anymodal.core.posenc import LearnedPosEnc, SinCosPosEnc
from anymodal.core.timm_compat import FrozenBatchNorm2d, backbone_state_from_timm_vit, import_timm, load_timm_vit
from anymodal.core.tokens import Tokens
from anymodal.tokenizers.image import ImagePatchTokenizer

DIM, HEADS, GRID = 32, 4, (4, 5)


def grid_tokens(batch: int = 3, grid=GRID, dim: int = DIM, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], -1).expand(batch, -1, -1)
    return Tokens(x=torch.randn(batch, pos.shape[1], dim, generator=g), pos=pos, grid=grid)


def make_encoder(posenc: str = "sincos", cls_token: bool = True, depth: int = 2, backend: str = "sdpa",
                 drop_path: float = 0.0, seed: int = 0, pack_ragged: bool | None = None) -> Encoder:
    torch.manual_seed(seed)
    pe = SinCosPosEnc(DIM, 2) if posenc == "sincos" else LearnedPosEnc(DIM, GRID)
    enc = Encoder(DIM, depth, HEADS, posenc=pe, drop_path=drop_path, attn_backend=backend, cls_token=cls_token,
                  pack_ragged=pack_ragged)
    with torch.no_grad():  # non-trivial norms, biases and class position
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc.eval()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=0))


# --------------------------------------------------------------------------------------------
# (a) attention kernels


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padding-mask"])
def test_sdpa_matches_math(with_mask):
    torch.manual_seed(0)
    sdpa = Attention(DIM, HEADS, backend="sdpa")
    math_ = Attention(DIM, HEADS, backend="math")
    math_.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 11, DIM)
    keep = None
    if with_mask:
        keep = torch.ones(3, 11, dtype=torch.bool)
        keep[1, 7:] = False
        keep[2, 2:] = False
    a, b = sdpa(x, keep), math_(x, keep)
    assert torch.isfinite(a).all()
    assert close(a, b), (a - b).abs().max()


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="attention backend"):
        Attention(DIM, HEADS, backend="nope")


def test_encoder_backends_agree_with_padding():
    tokens = grid_tokens()
    tokens.padding = torch.zeros(3, tokens.num_tokens, dtype=torch.bool)
    tokens.padding[0, 12:] = True
    a = make_encoder(backend="sdpa")(tokens)
    b = make_encoder(backend="math")(tokens)
    assert close(a.tokens.x, b.tokens.x) and close(a.cls, b.cls)


# --------------------------------------------------------------------------------------------
# (b) encoding at `index` == encoding only those tokens

ENCODER_VARIANTS = [("sincos", True), ("sincos", False), ("learned", True), ("learned", False)]


@pytest.mark.parametrize("posenc,cls_token", ENCODER_VARIANTS, ids=["sincos-cls", "sincos", "learned-cls", "learned"])
def test_index_equals_removing_tokens(posenc, cls_token):
    enc = make_encoder(posenc, cls_token)
    tokens = grid_tokens()
    b, n = tokens.batch_size, tokens.num_tokens
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(n, generator=g)[:7] for _ in range(b)])  # unsorted, per sample

    with torch.no_grad():
        via_index = enc(tokens, index)
        via_select = enc(tokens.select(index))
        # the same tokens as a fresh Tokens with the others removed (kept in original order)
        keep = torch.zeros(b, n, dtype=torch.bool).scatter_(1, index, True)
        removed = Tokens(x=torch.stack([tokens.x[i][keep[i]] for i in range(b)]),
                         pos=torch.stack([tokens.pos[i][keep[i]] for i in range(b)]), grid=tokens.grid)
        via_removed = enc(removed)

    assert close(via_index.tokens.x, via_select.tokens.x)
    assert torch.equal(via_index.tokens.pos, torch.gather(tokens.pos, 1, index[..., None].expand(-1, -1, 2)))
    order = index.argsort(dim=1)  # via_removed is in ascending index order
    reordered = torch.gather(via_index.tokens.x, 1, order[..., None].expand(-1, -1, DIM))
    assert close(reordered, via_removed.tokens.x), (reordered - via_removed.tokens.x).abs().max()
    if cls_token:
        assert close(via_index.cls, via_select.cls) and close(via_index.cls, via_removed.cls)
    else:
        assert via_index.cls is None and via_removed.cls is None


def test_index_gathers_targets_and_padding():
    tokens = grid_tokens(batch=2)
    tokens.targets = torch.randn(2, tokens.num_tokens, 6)
    tokens.padding = torch.zeros(2, tokens.num_tokens, dtype=torch.bool)
    index = torch.tensor([[3, 0, 9], [1, 2, 19]])
    out = make_encoder()(tokens, index).tokens
    assert torch.equal(out.targets, tokens.select(index).targets)
    assert out.padding.shape == (2, 3)


# --------------------------------------------------------------------------------------------
# (c) padding invariance


@pytest.mark.parametrize("pack_ragged", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("posenc,cls_token", ENCODER_VARIANTS, ids=["sincos-cls", "sincos", "learned-cls", "learned"])
def test_padding_invariance(posenc, cls_token, backend, pack_ragged):
    enc = make_encoder(posenc, cls_token, backend=backend, pack_ragged=pack_ragged)
    full = grid_tokens(batch=2)
    n, short = full.num_tokens, 9
    g = torch.Generator().manual_seed(2)
    # sample 1 keeps `short` real tokens; the rest is junk (random embeddings, in-grid positions) marked padding
    x = full.x.clone()
    x[1, short:] = 100.0 * torch.randn(n - short, DIM, generator=g)
    pos = full.pos.clone()
    pos[1, short:] = torch.stack([torch.randint(0, GRID[0], (n - short,), generator=g),
                                  torch.randint(0, GRID[1], (n - short,), generator=g)], -1)
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, short:] = True
    padded = Tokens(x=x, pos=pos, padding=padding, grid=GRID)

    with torch.no_grad():
        batched = enc(padded)
        alone0 = enc(Tokens(x=full.x[:1], pos=full.pos[:1], grid=GRID))
        alone1 = enc(Tokens(x=full.x[1:, :short], pos=full.pos[1:, :short], grid=GRID))

    assert close(batched.tokens.x[:1], alone0.tokens.x)
    assert close(batched.tokens.x[1:, :short], alone1.tokens.x)
    assert close(batched.pool("mean")[1:], alone1.pool("mean"))
    if cls_token:
        assert close(batched.cls[:1], alone0.cls) and close(batched.cls[1:], alone1.cls)


def ragged_tokens(lengths=(20, 7, 13, 1), seed: int = 3) -> Tokens:
    """Junk-filled padding (huge values) so that any leak of it would show."""
    tokens = grid_tokens(batch=len(lengths), seed=seed)
    tokens.padding = torch.arange(tokens.num_tokens)[None, :] >= torch.tensor(lengths)[:, None]
    tokens.x = torch.where(tokens.padding[..., None], 1e3 * torch.ones_like(tokens.x), tokens.x)
    return tokens


def test_packed_layout_round_trip():
    keep = ~ragged_tokens().padding
    packed = Packed.from_keep(keep)
    x = torch.randn(*keep.shape, 5)
    assert packed.seqlens == [20, 7, 13, 1] and packed.pack(x).shape == (1, 41, 5)
    assert torch.equal(packed.unpack(packed.pack(x)), x * keep[..., None])
    same = packed.block_mask(x.device)
    assert same.sum().item() == sum(n * n for n in packed.seqlens)  # block diagonal, one block per sample


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "no-cls"])
def test_packed_encoding_equals_padded_forward_and_backward(cls_token):
    """The packed path (what xformers' block-diagonal kernel runs) against the padded SDPA path:
    same features on real tokens, same pooled and class features, same kept layers, same gradients."""
    tokens = ragged_tokens()
    real = (~tokens.padding)[..., None]
    outs, grads = [], []
    for pack in (False, True):
        enc = make_encoder(cls_token=cls_token, depth=3, pack_ragged=pack).train()
        enc.grad_checkpointing = pack  # and recomputation sees the packed layout too
        out = enc(tokens, layers=2)
        loss = (out.tokens.x * real).pow(2).sum() + out.pool("mean").sum() + sum((y * real).sum() for y in out.layers)
        if cls_token:
            loss = loss + out.cls.pow(3).sum()
        loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None]))
    padded, packed = outs
    assert close(packed.tokens.x * real, padded.tokens.x * real, atol=1e-4)
    assert torch.equal(packed.tokens.x * ~real, torch.zeros_like(packed.tokens.x))  # nothing computed at padding
    assert close(packed.pool("mean"), padded.pool("mean"), atol=1e-5)
    assert all(close(a * real, b * real, atol=1e-4) for a, b in zip(packed.layers, padded.layers))
    if cls_token:
        assert close(packed.cls, padded.cls, atol=1e-5)
    assert close(grads[1], grads[0], atol=1e-3) and grads[0].abs().max() > 0


def test_xformers_packs_ragged_batches_by_default():
    pe = SinCosPosEnc(DIM, 2)
    assert not Encoder(DIM, 1, HEADS, posenc=pe).pack_ragged
    if importlib.util.find_spec("xformers") is not None:
        assert Encoder(DIM, 1, HEADS, posenc=pe, attn_backend="xformers").pack_ragged


def test_packed_layout_is_xformers_block_diagonal_mask():
    """The bias handed to xformers' kernel allows exactly what the explicit packed mask allows."""
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")  # its mask classes are plain Python
    packed = Packed.from_keep(~ragged_tokens().padding)
    bias = packed.xformers_bias(torch.device("cpu"))
    assert isinstance(bias, attn_bias.BlockDiagonalMask)
    t = sum(packed.seqlens)
    assert torch.equal(bias.materialize((t, t)) == 0, packed.block_mask(torch.device("cpu")))


# --------------------------------------------------------------------------------------------
# (e) drop-path


def test_drop_path_identity_in_eval_stochastic_in_train():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert torch.equal(dp.eval()(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # whole samples dropped, the rest rescaled
    assert (y[:, 0:1] == y).all()
    assert abs(float((y[:, 0] == 0).float().mean()) - 0.5) < 0.05
    assert abs(float(y.mean()) - 1.0) < 0.1
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_encoder_drop_path_eval_vs_train():
    tokens = grid_tokens(batch=8)
    dropping = make_encoder(drop_path=0.5, depth=4)
    plain = make_encoder(drop_path=0.0, depth=4)
    plain.load_state_dict(dropping.state_dict())
    with torch.no_grad():
        ref = plain(tokens).tokens.x
        assert torch.equal(dropping.eval()(tokens).tokens.x, ref)
        dropping.train()
        torch.manual_seed(0)
        a = dropping(tokens).tokens.x
        torch.manual_seed(1)
        b = dropping(tokens).tokens.x
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, ref)


# --------------------------------------------------------------------------------------------
# (f) sizes

# timm's published parameter counts for vit_{size}_patch16_224 (1000-class head included)
TIMM_VIT_PARAMS = {"tiny": 5_717_416, "small": 22_050_664, "base": 86_567_656, "large": 304_326_632}


def vit_backbone(dim: int, depth: int, heads: int, image_size: int = 224, patch: int = 16, channels: int = 3,
                 cls_token: bool = True) -> Backbone:
    tok = ImagePatchTokenizer(dim, image_size, patch, channels)
    return Backbone(tok, Encoder(dim, depth, heads, posenc=LearnedPosEnc(dim, tok.grid_size), cls_token=cls_token))


@pytest.mark.parametrize("size", list(ENCODER_SIZES))
def test_sizes_match_timm_param_counts(size):
    dim, depth, heads = ENCODER_SIZES[size]

    def count(d: int) -> int:
        return sum(p.numel() for p in vit_backbone(dim, d, heads).parameters())

    # blocks are identical, so two shallow models give the full-depth count without building it
    one, two = count(1), count(2)
    head = dim * 1000 + 1000
    assert one + (depth - 1) * (two - one) + head == TIMM_VIT_PARAMS[size]


def test_encoder_builds_on_meta_device():
    with torch.device("meta"):
        enc = Encoder(DIM, 2, HEADS, posenc=LearnedPosEnc(DIM, GRID), drop_path=0.1)
    assert all(p.is_meta for p in enc.parameters())


def test_tiny_forward_backward():
    dim, depth, heads = ENCODER_SIZES["tiny"]
    backbone = vit_backbone(dim, depth, heads, image_size=32, patch=8)
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.tokenize({"image": images})
    index = torch.tensor([[0, 5, 9, 15], [2, 3, 4, 11]])
    out = backbone.encode(tokens, index)
    assert out.tokens.x.shape == (2, 4, dim) and out.cls.shape == (2, dim)
    loss = out.tokens.x.square().mean() + backbone.pool(out).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in backbone.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["encoder.posenc.table"][1].abs().sum() == 0  # position 1 was never used
    assert grads["encoder.posenc.table"][5].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# (d) timm


def test_frozen_batchnorm_matches_batchnorm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, as torchvision does
    x = torch.randn(2, 5, 3, 4)
    assert close(frozen(x), bn.eval()(x))
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert not list(frozen.parameters())


def test_import_timm_missing_says_no_deps(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` -> ModuleNotFoundError(name="timm")
    with pytest.raises(ImportError, match="--no-deps"):
        import_timm()


@pytest.fixture(scope="module")
def timm():
    try:
        return import_timm()
    except ImportError as err:
        pytest.skip(f"timm unavailable: {err}")


def randomized_timm_vit(timm, **kwargs) -> nn.Module:
    kwargs = {"pretrained": False, "img_size": 32, "patch_size": 4, "num_classes": 0, "depth": 2, **kwargs}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    with torch.no_grad():  # exercise every weight, including zero-initialized biases and norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", ["cls", "no-embed-class", "no-cls"])
def test_timm_vit_parity(timm, variant):
    kwargs = {"cls": {}, "no-embed-class": {"no_embed_class": True},
              "no-cls": {"class_token": False, "global_pool": "avg", "fc_norm": False}}[variant]
    model = randomized_timm_vit(timm, **kwargs)
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    backbone = vit_backbone(dim, len(model.blocks), heads, image_size=32, patch=4, cls_token=variant != "no-cls")
    load_timm_vit(backbone, model.state_dict())
    backbone.eval()

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(images)
        out = backbone.encode(backbone.tokenize({"image": images}))
    if variant == "no-cls":
        assert ref.shape == (2, 64, dim) and out.cls is None
        assert (out.tokens.x - ref).abs().max() < 1e-4
    else:
        assert ref.shape == (2, 65, dim)
        assert (out.cls - ref[:, 0]).abs().max() < 1e-4
        assert (out.tokens.x - ref[:, 1:]).abs().max() < 1e-4


def test_timm_state_key_mapping(timm):
    state = randomized_timm_vit(timm, num_classes=10).state_dict()
    converted = backbone_state_from_timm_vit(state)
    assert torch.equal(converted["encoder.cls_pos"], state["pos_embed"][:, :1])
    assert torch.equal(converted["encoder.posenc.table"], state["pos_embed"][0, 1:])
    assert torch.equal(converted["tokenizer.proj.weight"], state["patch_embed.proj.weight"])
    assert torch.equal(converted["encoder.blocks.1.mlp.fc2.bias"], state["blocks.1.mlp.fc2.bias"])
    assert not any(k.startswith("head") for k in converted)


@pytest.mark.parametrize("kwargs,key", [({"init_values": 1e-5}, "ls1.gamma"), ({"reg_tokens": 4}, "reg_token"),
                                        ({"qk_norm": True}, "q_norm")], ids=["layer-scale", "reg-tokens", "qk-norm"])
def test_timm_unsupported_keys_raise(timm, kwargs, key):
    state = randomized_timm_vit(timm, depth=1, **kwargs).state_dict()
    with pytest.raises(ValueError, match=key):
        backbone_state_from_timm_vit(state)


def test_timm_unsupported_key_in_plain_dict():
    state = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8), "blocks.0.ls1.gamma": torch.ones(8)}
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        backbone_state_from_timm_vit(state)


def test_timm_fc_norm_model_raises(timm):
    # global_pool="avg" normalizes after pooling (fc_norm) and leaves no final per-token norm
    state = randomized_timm_vit(timm, class_token=False, global_pool="avg").state_dict()
    with pytest.raises(ValueError, match="fc_norm"):
        backbone_state_from_timm_vit(state)


def test_load_timm_vit_mismatch_names_keys(timm):
    state = randomized_timm_vit(timm).state_dict()
    wrong_patch = vit_backbone(192, 2, 3, image_size=32, patch=8)
    with pytest.raises(ValueError, match=r"tokenizer\.proj\.weight.*\(192, 3, 4, 4\)"):
        load_timm_vit(wrong_patch, state)
    too_shallow = vit_backbone(192, 1, 3, image_size=32, patch=4)
    with pytest.raises(ValueError, match=r"not in the model \(first: encoder\.blocks\.1\."):
        load_timm_vit(too_shallow, state)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_import_timm_stands_in_for_missing_torchvision():
    # a fresh interpreter in which torchvision cannot be imported, whatever this machine has installed
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "from anymodal.core.timm_compat import import_timm, FrozenBatchNorm2d\n"
        "timm = import_timm()\n"
        "import torchvision.ops.misc as m\n"
        "assert m.FrozenBatchNorm2d is FrozenBatchNorm2d\n"
        "model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=4, depth=1)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's anymodal
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert "torchvision is unavailable" in result.stderr
