"""Lidar point ops and tokenizers against independent float64 / Python-loop references."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from anymodal.core.backbone import Backbone
from anymodal.core.data import collate
from anymodal.core.encoder import Encoder
from anymodal.core.masking import RandomMasker
from anymodal.core.objective import Batch
from anymodal.core.posenc import build_posenc
from anymodal.objectives.masked_pixel import MaskedPixel
from anymodal.tokenizers.pillars import PillarTokenizer, assign_pillars, scatter_pool
from anymodal.tokenizers.point_ops import chamfer_distance, farthest_point_sample, knn_group
from anymodal.tokenizers.points import PointPatchTokenizer


def _cloud(n, seed, channels=3, scale=1.0):
    return torch.randn(n, channels, generator=torch.Generator().manual_seed(seed)) * scale


def _fps_reference(xyz, num):
    """Textbook greedy FPS in float64 from point 0 over a plain [n, 3] array."""
    xyz = np.asarray(xyz, dtype=np.float64)
    picks = [0]
    dist = ((xyz - xyz[0]) ** 2).sum(1)
    for _ in range(num - 1):
        picks.append(int(dist.argmax()))
        dist = np.minimum(dist, ((xyz - xyz[picks[-1]]) ** 2).sum(1))
    return picks


def test_fps_matches_greedy_reference_and_never_picks_padding():
    clouds = [_cloud(40, 1), _cloud(25, 2)]
    # padding at the end (as collate makes it) and, for the second row, scattered in between
    xyz = torch.zeros(2, 40, 3)
    padding = torch.ones(2, 40, dtype=torch.bool)
    xyz[0] = clouds[0]
    padding[0] = False
    slots = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:25].sort().values
    xyz[1, slots] = clouds[1]
    xyz[1, ~torch.isin(torch.arange(40), slots)] = 100.0  # far away: FPS would love these if it saw them
    padding[1, slots] = False
    picks = farthest_point_sample(xyz, 12, padding)
    assert picks.shape == (2, 12) and picks.dtype == torch.long
    assert picks[0].tolist() == _fps_reference(clouds[0], 12)
    assert picks[1].tolist() == slots[_fps_reference(clouds[1], 12)].tolist()
    assert not padding.gather(1, picks).any()
    assert all(len(set(row)) == 12 for row in picks.tolist())


def test_fps_greedy_property_duplicates_short_clouds_and_generator():
    xyz = _cloud(30, 4)[None]
    picks = farthest_point_sample(xyz, 10)[0]
    for i in range(1, 10):  # each pick is the farthest from the picks before it
        taken = xyz[0, picks[:i]].double()
        d = torch.cdist(xyz[0].double(), taken).amin(1)
        assert d[picks[i]] == pytest.approx(float(d.max()), abs=1e-6)
    dup = torch.cat([xyz, xyz], 1)  # every point twice: still distinct indices
    assert len(set(farthest_point_sample(dup, 50)[0].tolist())) == 50
    short = torch.zeros(1, 8, 3)
    short[0, :3] = _cloud(3, 5)
    pad = torch.tensor([[False] * 3 + [True] * 5])
    out = farthest_point_sample(short, 7, pad)[0].tolist()
    assert out == out[:3] * 2 + out[:1] and sorted(out[:3]) == [0, 1, 2]
    g = farthest_point_sample(xyz, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g, farthest_point_sample(xyz, 5, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="no valid points"):
        farthest_point_sample(short, 2, torch.ones(1, 8, dtype=torch.bool))


TRITON_FPS_CHECK = """
import torch
from anymodal.tokenizers.point_ops import farthest_point_sample
g = torch.Generator().manual_seed(0)
xyz = torch.randn(4, 2500, 3, generator=g)  # three 1,024-point tiles per cloud
xyz[3, 1000:2000] = xyz[3, :1000]  # duplicates
padding = torch.zeros(4, 2500, dtype=torch.bool)
padding[1, 1800:] = True  # ragged, as collate pads
padding[2] = torch.rand(2500, generator=g) < 0.5  # scattered
padding[3, 5:] = True  # fewer valid points than picks
for seed in (None, 1):  # first pick: the first valid point, or a random one
    loop, fused = (farthest_point_sample(xyz, 40, padding, kernel=kernel,
                                         generator=None if seed is None else torch.Generator().manual_seed(seed))
                   for kernel in ("torch", "triton"))
    assert torch.equal(loop, fused), (loop != fused).nonzero()[:5]
from anymodal.tokenizers.points import PointPatchTokenizer
loop_tok = PointPatchTokenizer(32, groups=16, group_size=8, widths=(8, 16, 32))
fused_tok = PointPatchTokenizer(32, groups=16, group_size=8, widths=(8, 16, 32), fps_kernel="triton")
fused_tok.load_state_dict(loop_tok.state_dict())
a, b = loop_tok(xyz[:3], padding[:3]), fused_tok(xyz[:3], padding[:3])
assert torch.equal(a.x, b.x) and torch.equal(a.pos, b.pos)
print("same picks")
"""


def test_triton_fps_kernel_gives_the_loops_picks():
    """The fused GPU kernel, run by Triton's interpreter on this CPU, one program per cloud; the
    multi-program path (one cloud over many SMs) is checked on a GPU by benchmarks/lidar_ops.py --gpu."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_FPS_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "same picks" in proc.stdout, proc.stderr[-3000:]
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        farthest_point_sample(torch.zeros(1, 4, 3), 2, kernel="triton")
    with pytest.raises(ValueError, match="kernel must be"):
        farthest_point_sample(torch.zeros(1, 4, 3), 2, kernel="cuda")
    with pytest.raises(ValueError, match="fps_kernel must be"):
        PointPatchTokenizer(32, fps_kernel="cuda")


def _knn_reference(xyz, centres, k, valid):
    d = ((centres[:, None].double() - xyz[None].double()) ** 2).sum(-1)
    d[:, ~valid] = float("inf")
    return d.sort(1).values[:, :k]


@pytest.mark.parametrize("n", [300, 12000])  # brute force, and the pruned search for big clouds
def test_knn_equals_brute_force(n):
    g = torch.Generator().manual_seed(6)
    xyz = torch.randn(2, n, 3, generator=g) * torch.tensor([20.0, 20.0, 1.0])
    xyz[:, :50] = torch.randn(2, 50, 3, generator=g) * 200  # sparse outliers: the pruned search's fallbacks
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, n // 2:] = True
    centres = torch.cat([xyz[:, :10], torch.randn(2, 20, 3, generator=g) * 20], 1)
    idx = knn_group(xyz, centres, 16, padding)
    assert idx.shape == (2, 30, 16) and not padding.gather(1, idx.flatten(1)).any()
    for b in range(2):
        got = ((xyz[b, idx[b]].double() - centres[b, :, None].double()) ** 2).sum(-1)
        torch.testing.assert_close(got, _knn_reference(xyz[b], centres[b], 16, ~padding[b]), rtol=1e-5, atol=1e-4)
    few = knn_group(xyz[:, :5], centres[:, :3], 8)  # fewer points than k: the nearest fills the rest
    assert few.shape == (2, 3, 8) and torch.equal(few[..., 5:], few[..., :1].expand(-1, -1, 3))


def test_pillar_assignment_and_pooling_equal_a_python_loop():
    g = torch.Generator().manual_seed(7)
    xyz = torch.rand(2, 60, 3, generator=g) * torch.tensor([6.0, 6.0, 3.0]) - torch.tensor([3.0, 3.0, 1.0])
    padding = torch.zeros(2, 60, dtype=torch.bool)
    padding[1, 45:] = True
    point_range, size, grid = (-2.0, -2.0, -0.5, 2.0, 2.0, 1.5), (1.0, 0.5), (8, 4)
    a = assign_pillars(xyz, padding, point_range, size, grid)
    feats = torch.randn(a.point.numel(), 5, generator=g)
    groups = {}  # (cloud, row, col) -> list of kept-point positions, by a plain loop
    for b, i in itertools.product(range(2), range(60)):
        x, y, z = xyz[b, i].tolist()
        if padding[b, i] or not (-2 <= x < 2 and -2 <= y < 2 and -0.5 <= z < 1.5):
            continue
        groups.setdefault((b, int((y + 2) // 0.5), int((x + 2) // 1.0)), []).append(b * 60 + i)
    keys = sorted(groups)
    assert a.num_pillars == len(keys)
    assert [(c, r, q) for c, r, q in zip(a.cloud.tolist(), a.row.tolist(), a.col.tolist())] == keys
    assert a.counts.tolist() == [sum(k[0] == b for k in keys) for b in range(2)]
    assert a.slot.tolist() == [keys[:j].count(None) + sum(k[0] == keys[j][0] for k in keys[:j]) for j in range(len(keys))]
    position = {p: j for j, p in enumerate(a.point.tolist())}
    for j, key in enumerate(keys):
        rows = feats[[position[p] for p in groups[key]]]
        assert sorted(groups[key]) == sorted(a.point[a.pillar == j].tolist())
        torch.testing.assert_close(scatter_pool(feats, a.pillar, a.num_pillars, "amax")[j], rows.max(0).values)
        torch.testing.assert_close(scatter_pool(feats, a.pillar, a.num_pillars, "mean")[j], rows.mean(0))


def test_linear_max_pool_chunked_and_whole_agree_with_gradients():
    """The pillar encoder's linear + max-pool: chunked in place without autograd, one scatter with
    it; both equal the plain scatter of the full activations, and the gradients match too."""
    from anymodal.tokenizers.pillars import _POOL_CHUNK, _linear_max_pool

    g = torch.Generator().manual_seed(3)
    points, pillars = 2 * _POOL_CHUNK + 123, 300
    feats = torch.randn(points, 9, generator=g, requires_grad=True)
    weight = torch.randn(16, 9, generator=g, requires_grad=True)
    pillar = torch.cat([torch.arange(pillars), torch.randint(0, pillars, (points - pillars,), generator=g)])
    pillar = pillar[torch.randperm(points, generator=g)]
    reference = scatter_pool(feats @ weight.t(), pillar, pillars, "amax")
    with torch.no_grad():
        torch.testing.assert_close(_linear_max_pool(feats, weight, pillar, pillars), reference.detach())
    pooled = _linear_max_pool(feats, weight, pillar, pillars)
    torch.testing.assert_close(pooled, reference)
    upstream = torch.randn(pillars, 16, generator=g)
    want = torch.autograd.grad((reference * upstream).sum(), (feats, weight))
    got = torch.autograd.grad((pooled * upstream).sum(), (feats, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _chamfer_reference(pred, target, valid, kind):
    total, groups = 0.0, 0
    for p, t, v in zip(pred.reshape(-1, *pred.shape[-2:]).tolist(), target.reshape(-1, *target.shape[-2:]).tolist(),
                       valid.reshape(-1, valid.shape[-1]).tolist()):
        ts = [np.array(x) for x, ok in zip(t, v) if ok]
        if not ts:
            continue
        ps = [np.array(x) for x in p]
        dist = (lambda a, b: float(((a - b) ** 2).sum())) if kind == "l2" else (lambda a, b: float(np.sqrt(((a - b) ** 2).sum())))
        total += np.mean([min(dist(a, b) for b in ts) for a in ps]) + np.mean([min(dist(a, b) for a in ps) for b in ts])
        groups += 1
    return total / max(groups, 1)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_chamfer_matches_a_float64_reference(kind):
    g = torch.Generator().manual_seed(8)
    pred, target = torch.randn(2, 3, 5, 3, generator=g), torch.randn(2, 3, 6, 3, generator=g)
    valid = torch.rand(2, 3, 6, generator=g) > 0.4
    valid[0, 1] = False  # a group with no valid target is left out of the mean
    got = chamfer_distance(pred, target, valid, kind)
    assert got.item() == pytest.approx(_chamfer_reference(pred.double(), target.double(), valid, kind), rel=1e-5)
    full = torch.ones(2, 3, 6, dtype=torch.bool)
    assert chamfer_distance(pred, target, None, kind).item() == pytest.approx(
        _chamfer_reference(pred.double(), target.double(), full, kind), rel=1e-5)
    assert chamfer_distance(target, target, None, kind).item() < 1e-5
    p = pred.clone().requires_grad_()
    chamfer_distance(p, target, valid, kind).backward()
    assert torch.isfinite(p.grad).all()


def _ragged(clouds):
    batch = collate([{"points": c} for c in clouds])
    return batch["points"], batch.get("points_padding")


def _assert_same_valid_tokens(batched, i, alone):
    keep = batched.valid()[i]
    assert int(keep.sum()) == int(alone.valid()[0].sum())
    for name in ("x", "pos", "targets"):
        a, b = getattr(batched, name)[i][keep], getattr(alone, name)[0][alone.valid()[0]]
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def test_point_patch_tokenizer_shapes_ragged_and_errors():
    tok = PointPatchTokenizer(dim=32, groups=8, group_size=6, channels=4, widths=(16, 32, 64)).eval()
    clouds = [_cloud(n, n, channels=4) for n in (50, 30, 6)]
    points, padding = _ragged(clouds)
    with torch.no_grad():
        t = tok(points, padding)
        assert t.x.shape == (3, 8, 32) and t.pos.shape == (3, 8, 3) and t.pos.dtype == torch.float32
        assert t.targets.shape == (3, 8, 18) and tok.target_dim == 18 and t.grid is None
        assert t.padding is not None and t.padding[2, 6:].all() and not t.padding[:2].any() and not t.padding[2, :6].any()
        for i, c in enumerate(clouds):
            _assert_same_valid_tokens(t, i, tok(c[None]))
    targets = t.targets.view(3, 8, 6, 3)  # relative to the centre: the centre itself is its own nearest point
    assert torch.allclose(targets[:, :, 0], torch.zeros(3, 8, 3))
    assert tok.reconstruction_loss(t.targets, t.targets).item() < 1e-6
    for bad in (torch.zeros(2, 10), torch.zeros(2, 10, 2), torch.zeros(1, 2, 10, 3)):
        with pytest.raises(ValueError, match=r"\[B, N, C\].*got shape"):
            tok(bad)
    with pytest.raises(ValueError, match="C >= 4"):
        tok(torch.zeros(1, 20, 3))
    with pytest.raises(ValueError, match="loss"):
        PointPatchTokenizer(dim=8, loss="mse")


def test_pillar_tokenizer_shapes_targets_ragged_and_errors():
    tok = PillarTokenizer(dim=16, point_range=(-4, -4, -2, 4, 4, 2), pillar_size=1.0, max_points=4, hidden=8).eval()
    assert tok.grid_size == (8, 8) and tok.target_dim == 16 and tok.pos_axes == 2
    g = torch.Generator().manual_seed(9)
    clouds = [torch.cat([torch.rand(n, 3, generator=g) * 10 - 5, torch.rand(n, 1, generator=g)], 1) for n in (200, 90, 40)]
    points, padding = _ragged(clouds)
    with torch.no_grad():
        t = tok(points, padding)
        alone = [tok(c[None]) for c in clouds]
    assert t.x.shape[:2] == t.pos.shape[:2] == t.padding.shape == t.targets.shape[:2] and t.pos.dtype == torch.long
    assert t.num_tokens == max(a.num_tokens for a in alone) and t.grid == (8, 8)
    for i, a in enumerate(alone):
        _assert_same_valid_tokens(t, i, a)
    slots = t.targets.view(3, -1, 4, 4)
    counts = {}
    for i, c in enumerate(clouds):  # every pillar keeps min(count, max_points) of its own points
        inside = ((c[:, :2] >= -4) & (c[:, :2] < 4)).all(1) & (c[:, 2] >= -2) & (c[:, 2] < 2)
        for p in c[inside]:
            key = (i, int((p[1] + 4) // 1), int((p[0] + 4) // 1))
            counts[key] = counts.get(key, []) + [p[:3]]
    for i, j in (~t.padding).nonzero().tolist():
        r, q = t.pos[i, j].tolist()
        own = torch.stack(counts[(i, r, q)])
        valid = slots[i, j, :, 3] > 0.5
        assert int(valid.sum()) == min(len(own), 4)
        world = slots[i, j, valid, :3] * torch.tensor([0.5, 0.5, 2.0]) + torch.tensor([q - 3.5, r - 3.5, 0.0])
        assert torch.cdist(world, own).amin(1).max() < 1e-5
    assert (slots[..., :3].abs() <= 1).all()
    # a perfect prediction puts every predicted point on a real one (here: empty slots copy slot 0)
    perfect = torch.where(slots[..., 3:] > 0.5, slots, slots[..., :1, :]).flatten(2)
    assert tok.reconstruction_loss(perfect, t.targets).item() < 1e-6
    assert tok.reconstruction_loss(t.targets, t.targets).item() > 0.01  # empty slots' zeros are not free
    with pytest.raises(ValueError, match="got shape"):
        tok(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="whole cells"):
        PillarTokenizer(dim=8, point_range=(0, 0, 0, 1, 1, 1), pillar_size=0.3)


def test_point_patch_masked_reconstruction_end_to_end():
    torch.manual_seed(0)
    tok = PointPatchTokenizer(dim=16, groups=8, group_size=4, widths=(16, 16, 32))
    student = Backbone(tok, Encoder(16, 1, 2, build_posenc("mlp", 16, 3)))
    objective = MaskedPixel(16, tok, decoder_dim=16, decoder_depth=1, decoder_heads=2, posenc="mlp")
    batch = collate([{"points": _cloud(n, n)} for n in (40, 20)])
    tokens = student.tokenize(batch)
    g = torch.Generator().manual_seed(1)
    out = objective(Batch(batch, tokens, RandomMasker(0.5)(tokens, g), g), student)
    out.loss.backward()
    assert torch.isfinite(out.loss) and tok.first[0].weight.grad is not None


def test_bird_eye_pictures_place_groups_at_their_centres():
    tok = PointPatchTokenizer(32, groups=16, group_size=32)
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 512, 3, generator=g)
    points[1, :, 0] *= 0.25  # a cloud narrow in x: its picture still spans the frame
    image = tok.preview(points)
    assert image.shape == (2, 1, 64, 64) and image[1].sum() > 200
    assert image[:, 0, :, 0].any() and image[:, 0, :, -1].any() and image[:, 0, 0].any() and image[:, 0, -1].any()
    targets = tok(points).targets
    keep = torch.ones(targets.shape[:2], dtype=torch.bool)
    whole = tok.render(points, targets, keep)
    assert whole.sum() > 0.5 * image.sum() and (whole <= image).all()  # the true groups: input points only
    keep[:, ::2] = False
    half = tok.render(points, targets, keep)
    assert 0 < half.sum() < whole.sum() and (half <= whole).all()
    assert tok.render(points, targets, torch.zeros_like(keep)).sum() == 0
    # y up: a point at the top of the extent is drawn in the top row
    top = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    assert _bird(top)[0, 0, 0, -1] == 1 and _bird(top)[0, 0, -1, 0] == 1


def _bird(xyz):
    from anymodal.tokenizers.point_ops import bird_eye_view

    return bird_eye_view(xyz, xyz[..., :2].amin(1, keepdim=True), xyz[..., :2].amax(1, keepdim=True), 8)


def test_pillar_pictures_draw_the_held_points_in_their_pillars():
    tok = PillarTokenizer(32, point_range=(-8.0, -8.0, -3.0, 8.0, 8.0, 3.0), pillar_size=1.0, max_points=64)
    g = torch.Generator().manual_seed(0)
    cloud = torch.cat([torch.rand(2, 600, 2, generator=g) * 12 - 6, torch.rand(2, 600, 2, generator=g) - 0.5], -1)
    padding = torch.zeros(2, 600, dtype=torch.bool)
    padding[1, 400:] = True  # a shorter second sweep, zero-padded: the padding is never drawn
    cloud[1, 400:] = 0.0
    tokens = tok(cloud, padding)
    image = tok.preview(cloud, tokens)
    assert image.shape == (2, 1, 32, 32)
    alone = tok(cloud[1:, :400])
    assert torch.equal(image[1], tok.preview(cloud[1:, :400], alone)[0])
    keep = ~tokens.padding
    whole = tok.render(cloud, tokens.targets, keep, tokens)
    assert ((whole > 0) & (image == 0)).sum() <= 0.01 * whole.sum() and whole.sum() > 0.9 * image.sum()
    some = keep & (torch.rand(keep.shape, generator=g) < 0.5)
    part = tok.render(cloud, tokens.targets, some, tokens)
    assert 0 < part.sum() < whole.sum() and (part <= whole).all()
