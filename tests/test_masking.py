"""Maskers: the Mask contract (disjoint, in range, never padding, static counts), ratios,
seeding, and each masker's spatial structure (tubes, blocks, multi-block context/targets)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch

from anymodal.core.masking import BlockMasker, Mask, MultiBlockMasker, RandomMasker, TubeMasker
from anymodal.core.tokens import Tokens

GRID_2D = (8, 8)
GRID_3D = (4, 6, 6)
MASKERS = {
    "random": lambda: RandomMasker(0.75),
    "block": lambda: BlockMasker(0.6),
    "tube": lambda: TubeMasker(0.75),
    "multiblock": lambda: MultiBlockMasker(),
}


def grid_positions(grid: Sequence[int]) -> torch.Tensor:
    """Row-major integer coordinates of every cell of ``grid``: ``[prod(grid), len(grid)]``."""
    axes = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    return torch.stack([a.flatten() for a in axes], dim=-1)


def grid_tokens(grid: Sequence[int], batch: int = 4, lengths: Optional[Sequence[int]] = None, dim: int = 8,
                seed: int = 0) -> Tokens:
    """Tokens on a full grid; with ``lengths``, sample b keeps its first ``lengths[b]`` tokens and the
    rest are padding whose positions are junk *inside* the grid (so only the flag marks them)."""
    g = torch.Generator().manual_seed(seed)
    pos = grid_positions(grid)
    n = pos.shape[0]
    pos = pos.expand(batch, -1, -1).clone()
    padding = None
    if lengths is not None:
        assert len(lengths) == batch
        padding = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
        junk = torch.stack([torch.randint(0, s, (batch, n), generator=g) for s in grid], dim=-1)
        pos = torch.where(padding[..., None], junk, pos)
    return Tokens(x=torch.randn(batch, n, dim, generator=g), pos=pos, padding=padding, grid=tuple(grid))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_contract(tokens: Tokens, mask: Mask) -> None:
    """The Mask contract every masker must keep."""
    b, n = tokens.x.shape[:2]
    valid = tokens.valid()
    for name, idx in (("visible", mask.visible), ("target", mask.target)):
        assert idx.dim() == 2 and idx.shape[0] == b, f"{name} has shape {tuple(idx.shape)}"
        assert idx.dtype == torch.long, f"{name} dtype {idx.dtype}"
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < n, f"{name} index out of range"
            assert bool(torch.gather(valid, 1, idx).all()), f"a padding slot is {name}"
    assert mask.visible.shape[1] >= 1, "no visible token"
    for i in range(b):
        vis, tgt = mask.visible[i].tolist(), mask.target[i].tolist()
        assert len(set(vis)) == len(vis), f"sample {i}: repeated visible index"
        assert len(set(tgt)) == len(tgt), f"sample {i}: repeated target index"
        assert not set(vis) & set(tgt), f"sample {i}: visible and target overlap"


def same_mask(a: Mask, b: Mask) -> bool:
    return torch.equal(a.visible, b.visible) and torch.equal(a.target, b.target)


def neighbour_score(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per sample: the mean number of 4-neighbours a selected cell has inside the selection."""
    h, w = grid
    sel = torch.zeros(index.shape[0], h * w).scatter_(1, index, 1.0).view(-1, h, w)
    n = torch.zeros_like(sel)
    n[:, 1:] += sel[:, :-1]
    n[:, :-1] += sel[:, 1:]
    n[:, :, 1:] += sel[:, :, :-1]
    n[:, :, :-1] += sel[:, :, 1:]
    return (n * sel).sum((1, 2)) / sel.sum((1, 2))


# --------------------------------------------------------------------------------------------
# the contract, for every masker


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", list(MASKERS))
def test_contract_full_grid(kind, grid):
    tokens = grid_tokens(grid, batch=6)
    for seed in range(3):
        check_contract(tokens, MASKERS[kind]()(tokens, gen(seed)))


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", list(MASKERS))
def test_contract_with_padding(kind, grid):
    n = math.prod(grid)
    lengths = [n, n - 5, n - 17, n - 1]
    tokens = grid_tokens(grid, batch=4, lengths=lengths)
    for seed in range(3):
        mask = MASKERS[kind]()(tokens, gen(seed))
        check_contract(tokens, mask)
        assert mask.visible.shape[1] + mask.target.shape[1] <= min(lengths)


@pytest.mark.parametrize("kind", list(MASKERS))
def test_seeded_generator_reproducible(kind):
    tokens = grid_tokens(GRID_3D, batch=3)
    masker = MASKERS[kind]()
    a, b, c = masker(tokens, gen(1)), masker(tokens, gen(1)), masker(tokens, gen(2))
    assert same_mask(a, b)
    assert not same_mask(a, c)


@pytest.mark.parametrize("kind", list(MASKERS))
def test_samples_get_different_masks(kind):
    tokens = grid_tokens(GRID_2D, batch=4)
    mask = MASKERS[kind]()(tokens, gen(0))
    assert not all(torch.equal(mask.target[0].sort().values, mask.target[i].sort().values) for i in range(1, 4))


# --------------------------------------------------------------------------------------------
# ratios


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("cls", [RandomMasker, BlockMasker], ids=["random", "block"])
def test_ratio_counts(cls, grid, ratio):
    tokens = grid_tokens(grid, batch=3)
    n = math.prod(grid)
    mask = cls(ratio)(tokens, gen(0))
    assert mask.target.shape[1] == round(ratio * n)
    assert mask.visible.shape[1] == n - round(ratio * n)


@pytest.mark.parametrize("cls", [RandomMasker, BlockMasker], ids=["random", "block"])
def test_ratio_counts_ragged_follow_shortest(cls):
    lengths = [64, 50, 40]
    tokens = grid_tokens(GRID_2D, batch=3, lengths=lengths)
    mask = cls(0.75)(tokens, gen(0))
    assert mask.target.shape[1] == round(0.75 * 40)
    assert mask.visible.shape[1] == 40 - round(0.75 * 40)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
def test_tube_ratio_counts(grid, ratio):
    # tube masking masks whole spatial cells: round(ratio * cells) cells, each T tokens
    tokens = grid_tokens(grid, batch=3)
    t, cells = grid[0], math.prod(grid[1:])
    mask = TubeMasker(ratio)(tokens, gen(0))
    assert mask.target.shape[1] == round(ratio * cells) * t
    assert mask.visible.shape[1] == (cells - round(ratio * cells)) * t


def test_high_ratio_keeps_one_visible():
    tokens = grid_tokens((2, 2), batch=2)
    mask = RandomMasker(0.99)(tokens, gen(0))
    assert mask.visible.shape[1] == 1 and mask.target.shape[1] == 3


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
@pytest.mark.parametrize("cls", [RandomMasker, BlockMasker, TubeMasker])
def test_invalid_ratio_raises(cls, ratio):
    with pytest.raises(ValueError, match="ratio"):
        cls(ratio)


@pytest.mark.parametrize("cls", [RandomMasker, BlockMasker])
def test_empty_sample_raises(cls):
    tokens = grid_tokens(GRID_2D, batch=2, lengths=[64, 0])
    with pytest.raises(ValueError):
        cls(0.5)(tokens, gen(0))


# --------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
def test_tube_same_spatial_mask_every_time_step(grid):
    tokens = grid_tokens(grid, batch=4)
    pos = tokens.pos[0]
    for seed in range(3):
        mask = TubeMasker(0.75)(tokens, gen(seed))
        for idx in (mask.visible, mask.target):
            for row in idx:
                p = pos[row]
                per_t = [{tuple(c) for c in p[p[:, 0] == t, 1:].tolist()} for t in range(grid[0])]
                assert all(s == per_t[0] for s in per_t), "a spatial cell is not masked at every time step"
                assert len(per_t[0]) * grid[0] == len(row)


def test_block_targets_are_clustered():
    # per sample, a block mask's target cells have many more 4-neighbours in the set than random ones
    ratio = 0.4
    block = torch.cat([neighbour_score(BlockMasker(ratio)(grid_tokens(GRID_2D, batch=1), gen(s)).target, GRID_2D)
                       for s in range(48)])
    rand = neighbour_score(RandomMasker(ratio)(grid_tokens(GRID_2D, batch=48), gen(0)).target, GRID_2D)
    assert block.mean() > 1.6 * rand.mean()


def test_block_clustering_does_not_degrade_with_batch_size():
    ratio = 0.4
    tokens = grid_tokens(GRID_2D, batch=128)
    block = neighbour_score(BlockMasker(ratio)(tokens, gen(0)).target, GRID_2D)
    rand = neighbour_score(RandomMasker(ratio)(tokens, gen(0)).target, GRID_2D)
    assert block.mean() > 1.6 * rand.mean()


def test_block_masks_blocks_in_3d():
    # 3-D blocks are boxes over (T, H, W): target tokens touch other targets far more than random ones
    tokens = grid_tokens(GRID_3D, batch=1)
    pos = tokens.pos[0]

    def score(idx: torch.Tensor) -> float:
        p = pos[idx]
        d = (p[:, None, :] - p[None, :, :]).abs().sum(-1)
        return float((d == 1).sum(1).float().mean())

    block = sum(score(BlockMasker(0.5)(tokens, gen(s)).target[0]) for s in range(20)) / 20
    rand = sum(score(RandomMasker(0.5)(tokens, gen(s)).target[0]) for s in range(20)) / 20
    assert block > 1.3 * rand


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
def test_multiblock_context_excludes_targets(grid):
    tokens = grid_tokens(grid, batch=8)
    mask = MultiBlockMasker()(tokens, gen(0))
    check_contract(tokens, mask)
    assert mask.visible.shape[1] >= 4 and mask.target.shape[1] >= 1


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
def test_multiblock_targets_are_union_of_boxes(grid):
    # one sample, so nothing is truncated to the batch minimum: the target set is exactly a union of at
    # most num_targets axis-aligned boxes, each spanning the whole time axis of a 3-D grid
    tokens = grid_tokens(grid, batch=1)
    pos = tokens.pos[0]
    masker = MultiBlockMasker(num_targets=2)
    for seed in range(10):
        mask = masker(tokens, gen(seed))
        tgt = pos[mask.target[0]]
        cells = {tuple(c) for c in tgt[:, -2:].tolist()}
        if len(grid) == 3:
            for t in range(grid[0]):
                assert {tuple(c) for c in tgt[tgt[:, 0] == t, 1:].tolist()} == cells, "a target box skips a time step"
            assert len(tgt) == len(cells) * grid[0]
        # the spatial footprint is covered by <= 2 rectangles whose cells are all targets:
        # every cell lies in a maximal all-target rectangle, and those are few
        assert cells, "no target"
        _assert_union_of_rectangles(cells, max_rects=2)
        # context (visible) is drawn from one box minus the targets
        vis = pos[mask.visible[0]]
        assert not {tuple(c) for c in vis.tolist()} & {tuple(c) for c in tgt.tolist()}


def _assert_union_of_rectangles(cells: set, max_rects: int) -> None:
    """``cells`` is a union of at most ``max_rects`` axis-aligned rectangles (checked greedily from
    the rectangles' top-left corners: a corner cell has no cell above and none to the left)."""
    rects = []
    remaining = set(cells)
    while remaining:
        h0, w0 = min(remaining)
        h1 = h0
        while (h1 + 1, w0) in cells:
            h1 += 1
        w1 = w0
        while all((h, w1 + 1) in cells for h in range(h0, h1 + 1)):
            w1 += 1
        rect = {(h, w) for h in range(h0, h1 + 1) for w in range(w0, w1 + 1)}
        rects.append(rect)
        remaining -= rect
        assert len(rects) <= 2 * max_rects, f"targets are not a union of {max_rects} boxes: {sorted(cells)}"


def test_multiblock_ragged_batch_truncates_to_shortest():
    lengths = [64, 60, 48]
    tokens = grid_tokens(GRID_2D, batch=3, lengths=lengths)
    mask = MultiBlockMasker()(tokens, gen(0))
    check_contract(tokens, mask)


def test_multiblock_impossible_config_raises():
    # targets covering the whole grid leave no context
    tokens = grid_tokens((4, 4), batch=2)
    with pytest.raises(ValueError, match="multiblock"):
        MultiBlockMasker(num_targets=4, target_scale=(1.0, 1.0), min_context=4)(tokens, gen(0))


def test_maskers_need_integer_grid_or_grid_shape():
    tokens = Tokens(x=torch.zeros(2, 10, 4), pos=torch.rand(2, 10, 3))
    for kind in ("block", "tube"):
        with pytest.raises(ValueError, match="needs integer grid positions"):
            MASKERS[kind]()(tokens, gen(0))
    check_contract(tokens, RandomMasker(0.5)(tokens, gen(0)))  # random masking needs no grid
    # multiblock falls back to nearest-neighbour blocks (the next test)
    check_contract(tokens, MultiBlockMasker(num_targets=1, min_context=2)(tokens, gen(0)))


def test_multiblock_on_continuous_positions_uses_nearest_neighbour_blocks():
    # point groups have xyz positions and no grid: a block is the tokens nearest a seed token
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(3, 64, 3, generator=g)
    padding = torch.zeros(3, 64, dtype=torch.bool)
    padding[2, 50:] = True
    tokens = Tokens(x=torch.zeros(3, 64, 8), pos=pos, padding=padding)
    mask = MultiBlockMasker(num_targets=1, target_scale=(0.2, 0.2), context_scale=(1.0, 1.0))(tokens, g)
    for b in range(3):
        vis, tgt = set(mask.visible[b].tolist()), set(mask.target[b].tolist())
        assert not vis & tgt and not any(padding[b, i] for i in vis | tgt)
    # one target block is a ball: every target is nearer to the block's centre than any real non-target
    for b in range(2):
        tgt = mask.target[b]
        centre = pos[b, tgt].mean(0)
        others = torch.tensor([i for i in range(64) if i not in set(tgt.tolist())])
        radius = (pos[b, tgt] - pos[b, tgt][0]).norm(dim=-1)
        assert radius.numel() == mask.target.shape[1]
        spread_in = (pos[b, tgt] - centre).norm(dim=-1).mean()
        spread_out = (pos[b, others] - centre).norm(dim=-1).mean()
        assert spread_in < spread_out
