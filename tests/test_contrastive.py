"""The contrastive objective: InfoNCE against a float64 reference, temperature bounds, the three
pairings, masked-input contrastive, attentive pooling, and negatives gathered across two real ranks."""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anymodal.core import distributed
from anymodal.core.backbone import Backbone
from anymodal.core.encoder import Encoder
from anymodal.core.masking import Mask
from anymodal.core.objective import Batch
from anymodal.core.posenc import build_posenc
from anymodal.objectives.contrastive import AttentivePool, Contrastive, info_nce
from anymodal.tokenizers.image import ImagePatchTokenizer
from anymodal.tokenizers.text import ByteTextTokenizer

DIM = 32
N_TOKENS = 16  # 16x16 images in 4x4 patches


def _backbone(seed=0):
    torch.manual_seed(seed)
    tok = ImagePatchTokenizer(DIM, image_size=16, patch_size=4, channels=1)
    return Backbone(tok, Encoder(DIM, 1, 4, build_posenc("sincos", DIM, 2), cls_token=False))


def _raw(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    captions = ["a cat", "a dog on grass", "two birds", "an empty street at night", "x", "yy", "zzz", "w"]
    return {
        "image": torch.randn(b, 1, 16, 16, generator=g),
        "image_view2": torch.randn(b, 1, 16, 16, generator=g),
        "rgb": torch.randn(b, 3, 8, 8, generator=g),
        "text": captions[:b],
    }


def _batch(raw, student, mask=None, seed=0):
    return Batch(raw, student.tokenize(raw), mask, torch.Generator().manual_seed(seed))


def _rgb_tokenizer():
    return ImagePatchTokenizer(DIM, image_size=8, patch_size=4, channels=3, input_key="rgb")


def _text(width=16, **kwargs):
    """The ``text`` argument of a pair=text objective: a small tower over a built byte tokenizer."""
    return {"tokenizer": ByteTextTokenizer(width), "depth": 1, "num_heads": 2, **kwargs}


# ---------------------------------------------------------------- the loss


def _reference_info_nce(a, b, scale):
    """Symmetric InfoNCE in float64 with explicit log-softmax loops."""
    a, b, n = a.double().tolist(), b.double().tolist(), len(a)

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    def nll(rows, cols, i):
        logits = [scale * dot(rows[i], cols[j]) for j in range(n)]
        top = max(logits)
        return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[i]

    return sum(nll(a, b, i) + nll(b, a, i) for i in range(n)) / (2 * n)


def test_info_nce_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(6, 5, generator=g), dim=-1)
    for scale in (1.0, 14.3, 100.0):
        expected = _reference_info_nce(a, b, scale)
        assert info_nce(a.double(), b.double(), torch.tensor(scale, dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-10)
        assert info_nce(a, b, torch.tensor(scale)).item() == pytest.approx(expected, abs=1e-4)
    # rows split across "ranks" with global negatives average to the full-batch loss
    scale = torch.tensor(14.3, dtype=torch.float64)
    a, b = a.double(), b.double()
    halves = [info_nce(a[i:i + 3], b[i:i + 3], scale, a, b, offset=i) for i in (0, 3)]
    assert (sum(halves) / 2).item() == pytest.approx(info_nce(a, b, scale).item(), abs=1e-12)


def test_info_nce_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        info_nce(torch.zeros(4, 3), torch.zeros(3, 3), torch.tensor(1.0))


# ---------------------------------------------------------------- temperature


def test_temperature_stays_within_bounds():
    bb = _backbone()
    obj = Contrastive(DIM, bb.tokenizer, pair="views", temperature=0.07, max_logit_scale=100.0)
    raw = _raw()
    opt = torch.optim.SGD([obj.log_scale], lr=10.0)
    opt.zero_grad()
    (-obj.logit_scale()).backward()  # push the inverse temperature up, far past the bound
    opt.step()
    assert obj.log_scale.item() > math.log(100.0)
    assert obj.logit_scale().item() == pytest.approx(100.0)
    out = obj(_batch(raw, bb), bb)
    assert obj.log_scale.item() == pytest.approx(math.log(100.0))  # clamped, as CLIP does after each step
    assert out.metrics["temperature"].item() == pytest.approx(0.01)
    opt.zero_grad()
    obj.logit_scale().backward()  # at the bound the gradient still flows, so it can come back
    assert obj.log_scale.grad.item() != 0.0
    opt.step()
    out = obj(_batch(raw, bb), bb)
    assert obj.logit_scale().item() == pytest.approx(1.0) and out.metrics["temperature"].item() == pytest.approx(1.0)

    fixed = Contrastive(DIM, bb.tokenizer, pair="views", temperature=0.1, learn_temperature=False)
    assert "log_scale" not in dict(fixed.named_parameters())
    assert fixed(_batch(raw, bb), bb).metrics["temperature"].item() == pytest.approx(0.1)


# ---------------------------------------------------------------- pairs


def test_text_pair_trains_both_towers():
    bb = _backbone()
    obj = Contrastive(DIM, bb.tokenizer, pair="text", embed_dim=16, text=_text(24, dim=24))
    raw = _raw()
    out = obj(_batch(raw, bb), bb)
    assert out.loss.dim() == 0 and set(out.metrics) == {"infonce", "temperature", "acc"}
    for value in out.metrics.values():  # read by the trainer in its one host sync per step
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert out.metrics["infonce"].item() == out.loss.item()
    out.loss.backward()
    for name, module in [("student tokenizer", bb.tokenizer), ("student encoder", bb.encoder),
                         ("text tokenizer", obj.text.tokenizer), ("text encoder", obj.text.encoder)]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached the {name}"
    assert obj.log_scale.grad is not None and obj.log_scale.grad.item() != 0.0
    a, b = obj.embed_sample(raw, bb), obj.embed_partner(raw, bb)
    assert a.shape == b.shape == (4, 16)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("pool", ["mean", "attentive"])
def test_views_pair_forward_backward(pool):
    bb = _backbone()
    obj = Contrastive(DIM, bb.tokenizer, pair="views", pool=pool)
    raw = _raw()
    out = obj(_batch(raw, bb), bb)
    out.loss.backward()
    assert torch.isfinite(out.loss) and bb.tokenizer.proj.weight.grad.abs().sum() > 0
    assert obj.sample_proj.weight.grad.abs().sum() > 0 and obj.partner_proj is None  # one head for both views
    # identical views are each other's nearest neighbours
    same = dict(raw, image_view2=raw["image"])
    out = obj(_batch(same, bb), bb)
    assert out.metrics["acc"].item() == 1.0
    torch.testing.assert_close(obj.embed_sample(same, bb), obj.embed_partner(same, bb))


def test_modality_pair():
    bb = _backbone()
    other = _rgb_tokenizer()
    weights = {k: v.clone() for k, v in other.state_dict().items()}
    obj = Contrastive(DIM, bb.tokenizer, pair="modality", other_tokenizer=other, pool="attentive")
    assert obj.other_tokenizer is other and obj.other_key == "rgb"
    for k, v in other.state_dict().items():  # a module given in Python is taken as it is
        torch.testing.assert_close(v, weights[k])
    out = obj(_batch(_raw(), bb), bb)
    out.loss.backward()
    assert obj.other_tokenizer.proj.weight.grad.abs().sum() > 0  # the second tokenizer trains too
    assert bb.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert obj.embed_partner(_raw(), bb).shape == (4, 128)


def test_modality_pair_with_positions_of_other_axes():
    # a 2-D image student paired with 3-D video tubelets: the partner gets its own positional encoding
    from anymodal.tokenizers.video import TubeletTokenizer

    bb = _backbone()
    clips = TubeletTokenizer(DIM, frames=4, image_size=8, tubelet=(2, 4, 4), channels=3, input_key="clip")
    obj = Contrastive(DIM, bb.tokenizer, pair="modality", other_tokenizer=clips, other_posenc="learned")
    raw = dict(_raw(), clip=torch.randn(4, 3, 4, 8, 8))
    out = obj(_batch(raw, bb), bb)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert obj.other_posenc.table.grad.abs().sum() > 0  # the partner's positions reach the encoder
    assert bb.encoder.posenc.num_axes == 2 and obj.other_posenc.table.shape == (2 * 2 * 2, DIM)
    # the student's own encoding would not take these positions
    with pytest.raises(ValueError, match="built for 2 axes got positions with 3"):
        bb.encode(clips(raw["clip"]))


# ---------------------------------------------------------------- masked-input contrastive


def _encoded_counts(bb):
    counts = []
    bb.encoder.register_forward_hook(lambda module, args, out: counts.append(out.tokens.x.shape[1]))
    return counts


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_masked_input_encodes_a_subset(ratio):
    bb = _backbone()
    counts = _encoded_counts(bb)
    expected = round((1 - ratio) * N_TOKENS)
    text = Contrastive(DIM, bb.tokenizer, pair="text", mask_ratio=ratio, text=_text())
    text(_batch(_raw(), bb), bb).loss.backward()
    assert counts == [expected]  # the text tower is not the student; captions are never masked
    counts.clear()
    views = Contrastive(DIM, bb.tokenizer, pair="views", mask_ratio=ratio)
    views(_batch(_raw(), bb), bb)
    assert counts == [expected, expected]  # both views are masked
    counts.clear()
    views.embed_sample(_raw(), bb), views.embed_partner(_raw(), bb)
    assert counts == [N_TOKENS, N_TOKENS]  # evaluation sees every token


def test_masked_input_draws_from_the_batch_generator():
    bb = _backbone()
    obj = Contrastive(DIM, bb.tokenizer, pair="views", mask_ratio=0.5)
    raw = _raw()
    losses = [obj(_batch(raw, bb, seed=s), bb).loss.item() for s in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]


def test_stage_mask_takes_precedence():
    bb = _backbone()
    counts = _encoded_counts(bb)
    obj = Contrastive(DIM, bb.tokenizer, pair="views", mask_ratio=0.75)
    visible = torch.arange(5).expand(4, 5)
    obj(_batch(_raw(), bb, mask=Mask(visible, torch.arange(5, 16).expand(4, 11))), bb)
    assert counts == [5, 4]  # the stage masker's 5 for the sample; the view draws its own 4


# ---------------------------------------------------------------- attentive pooling


def test_attentive_pool_ignores_padding():
    torch.manual_seed(0)
    pool = AttentivePool(DIM, num_heads=4)
    x = torch.randn(2, 6, DIM)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    junk = x.clone()
    junk[0, 4:] = 1e3 * torch.randn(2, DIM)
    out = pool(x, padding)
    torch.testing.assert_close(pool(junk, padding), out)
    torch.testing.assert_close(out[:1], pool(x[:1, :4]))
    assert not torch.allclose(pool(x)[0], out[0])
    with pytest.raises(ValueError, match="divisible"):
        AttentivePool(30, num_heads=4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    ({"pair": "audio_text"}, "unknown contrastive pair"),
    ({"pool": "cls"}, "unknown contrastive pool"),
    ({"temperature": 0.0}, "temperature must be in"),
    ({"temperature": 0.005}, "temperature must be in"),
    ({"max_logit_scale": 1.0}, "max_logit_scale must be above 1"),
    ({"mask_ratio": 1.0}, "ratio must be in \\[0, 1\\)"),
    ({"pair": "views", "text": {"dim": 16}}, "text tower of pair=text"),
    ({"pair": "views", "other_key": "rgb"}, "needs other_tokenizer"),
    ({"pair": "modality"}, "needs other_tokenizer"),
    ({"pair": "modality", "other_key": "rgb"}, "needs other_tokenizer"),
    # a config's nodes are built by core.build, never by the objective
    ({"pair": "modality", "other_tokenizer": {"name": "image_patch", "image_size": 8}}, "a built tokenizer"),
    ({"pair": "text"}, "needs text.tokenizer, a built text tokenizer"),
    ({"pair": "text", "text": {"tokenizer": {"name": "byte_text"}}}, "needs text.tokenizer, a built text tokenizer"),
    ({"pair": "text", "text": _text(16, dim=24)}, "text.dim is 24 but its tokenizer makes tokens of width 16"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Contrastive(DIM, _backbone().tokenizer, **kwargs)


def test_rejects_unknown_text_argument():
    with pytest.raises(TypeError, match="did you mean 'depth'"):
        Contrastive(DIM, _backbone().tokenizer, pair="text", text={"tokenizer": ByteTextTokenizer(16), "dept": 2})


@pytest.mark.parametrize("pair, drop", [("views", "image_view2"), ("text", "text"), ("modality", "rgb")])
def test_missing_partner_field(pair, drop):
    bb = _backbone()
    kwargs = {"modality": {"other_tokenizer": _rgb_tokenizer()}, "text": {"text": _text()}}.get(pair, {})
    obj = Contrastive(DIM, bb.tokenizer, pair=pair, **kwargs)
    assert obj.partner_key == drop  # retrieval evaluation reads the partners from this field
    raw = {k: v for k, v in _raw().items() if k != drop}
    with pytest.raises(KeyError, match=f"needs batch field '{drop}'"):
        obj(_batch(raw, bb), bb)


def test_partner_count_must_match():
    bb = _backbone()
    obj = Contrastive(DIM, bb.tokenizer, pair="text", text=_text())
    raw = dict(_raw(), text=["one caption"])
    with pytest.raises(ValueError, match="4 samples but 1 partners"):
        obj(_batch(raw, bb), bb)


# ---------------------------------------------------------------- negatives across ranks


def test_distributed_helpers_outside_a_group():
    x = torch.randn(3, 2)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather_with_grad(x) is x


def _gather_setup():
    bb = _backbone(seed=3)
    obj = Contrastive(DIM, bb.tokenizer, pair="views", embed_dim=16, pool="attentive")
    raw = _raw(b=8, seed=4)
    return bb, obj, raw["image"], raw["image_view2"]


def _gather_forward(bb, obj, images, views):
    raw = {"image": images, "image_view2": views}
    return obj(Batch(raw, bb.tokenize(raw), None, torch.Generator().manual_seed(0)), bb)


def _gather_params(bb, obj):
    return [("backbone." + n, p) for n, p in bb.named_parameters()] + [("objective." + n, p) for n, p in obj.named_parameters()]


def _gather_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        bb, obj, images, views = _gather_setup()
        local = len(images) // world
        x = images[rank * local:(rank + 1) * local].clone().requires_grad_(True)
        v = views[rank * local:(rank + 1) * local].clone().requires_grad_(True)
        out = _gather_forward(bb, obj, x, v)
        (out.loss / world).backward()  # what DDP's averaging of gradients over ranks amounts to
        grads = {}
        for name, p in _gather_params(bb, obj):
            dist.all_reduce(p.grad)
            grads[name] = p.grad
        torch.save({"loss": out.loss.detach(), "x": x.grad, "v": v.grad, "params": grads}, f"{out_dir}/rank{rank}.pt")
        # gloo aborts a rank whose peer tears the group down while its own last collective is
        # still in flight ("terminate called without an active exception"): leave together
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gather_across_two_ranks_equals_one_process(tmp_path):
    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    bb, obj, images, views = _gather_setup()
    x, v = images.clone().requires_grad_(True), views.clone().requires_grad_(True)
    out = _gather_forward(bb, obj, x, v)
    out.loss.backward()

    # each rank's loss is its rows' share of the global-batch loss
    assert ranks[0]["loss"].item() != pytest.approx(ranks[1]["loss"].item())
    assert (sum(r["loss"] for r in ranks) / world).item() == pytest.approx(out.loss.item(), abs=1e-5)
    torch.testing.assert_close(torch.cat([r["x"] for r in ranks]), x.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["v"] for r in ranks]), v.grad, atol=1e-6, rtol=1e-4)
    for name, p in _gather_params(bb, obj):
        torch.testing.assert_close(ranks[0]["params"][name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
