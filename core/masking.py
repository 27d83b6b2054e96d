"""Maskers: choose, per sample, which tokens the encoder sees and which an objective predicts.

A masker returns index sets into the token axis (``Mask.visible [B, Nv]``, ``Mask.target [B, Nt]``),
with the same counts for every sample of a batch so shapes stay static. Padding slots are never
visible and never targets. Every masker draws all randomness from the generator it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .registry import ArgumentError
from .schema import Items, Range
from .tokens import Tokens

__all__ = ["Mask", "RandomMasker", "BlockMasker", "TubeMasker", "MultiBlockMasker"]

_LAST = 4.0  # priority that sorts a token after every real candidate
_PAD = 8.0  # priority that sorts a padding slot after everything


@dataclass
class Mask:
    """Indices into the token axis: ``visible [B, Nv]`` for the encoder, ``target [B, Nt]`` to predict."""

    visible: Tensor
    target: Tensor


def _counts(tokens: Tokens) -> Tensor:
    return tokens.valid().sum(1)


def _take(priority: Tensor, valid: Tensor, start: int, count: int) -> Tensor:
    """Indices of the ``count`` tokens ranked from ``start`` by ascending priority; padding last."""
    priority = priority.masked_fill(~valid, _PAD)
    order = priority.argsort(dim=1, stable=True)
    return order[:, start:start + count]


def _grid_of(tokens: Tokens) -> tuple[int, ...]:
    if tokens.grid is not None:
        return tuple(tokens.grid)
    if tokens.pos.is_floating_point():
        raise ValueError("this masker needs integer grid positions (Tokens.pos); got continuous positions")
    return tuple(int(g) + 1 for g in tokens.pos.reshape(-1, tokens.pos.shape[-1]).amax(0).tolist())


def _split_ratio(n_real: int, ratio: float) -> tuple[int, int]:
    """(visible, target) counts for a masking ratio over ``n_real`` tokens; at least one visible."""
    if n_real < 1:
        raise ValueError("cannot mask a batch in which a sample has no real tokens (all padding)")
    n_target = min(int(round(ratio * n_real)), n_real - 1)
    return n_real - n_target, n_target


_RATIO = Range(0, 1, high_open=True)
_COUNT = Range(1, integer=True)
_SHARE = Range(0, 1, low_open=True)  # (0, 1]: a share of the grid or of the tokens
_ASPECT = Range(0, low_open=True)


def _check(argument: str, value: Any, rule: Any) -> None:
    """Raise `ArgumentError` naming ``argument`` when ``value`` breaks ``rule`` (a `core.schema` rule)."""
    problem = rule.problem(value)
    if problem:
        raise ArgumentError(argument, value, problem)


def _check_span(argument: str, value: Any, each: Range) -> None:
    """A ``(low, high)`` pair of numbers, each satisfying ``each``, with low <= high."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ArgumentError(argument, value, f"must be a [low, high] pair, each {each}")
    _check(argument, list(value), Items(each, length=2))
    if value[0] > value[1]:
        raise ArgumentError(argument, value, "must be a [low, high] pair with low <= high")


def _check_ratio(ratio: float) -> None:
    _check("ratio", ratio, _RATIO)


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _sample_boxes(grid: Sequence[int], batch: int, scale: tuple[float, float], aspect: tuple[float, float],
                  generator: torch.Generator, span_leading: bool) -> tuple[Tensor, Tensor]:
    """One axis-aligned box per sample over ``grid``: ``(lo, hi) [B, k]`` integer corners.

    The box covers ``scale`` of the last one or two axes' area with the given aspect ratio; leading
    axes (time) are spanned whole when ``span_leading`` else a random sub-range.
    """
    k = len(grid)
    extents = torch.ones(batch, k)
    area = _uniform(*scale, batch, generator)
    if k == 1:
        extents[:, 0] = area * grid[0]
    else:
        log_r = _uniform(math.log(aspect[0]), math.log(aspect[1]), batch, generator)
        r = log_r.exp()
        h, w = grid[-2], grid[-1]
        extents[:, -2] = (area * h * w * r).sqrt()
        extents[:, -1] = (area * h * w / r).sqrt()
        for axis in range(k - 2):
            extents[:, axis] = grid[axis] if span_leading else _uniform(1, grid[axis] + 1, batch, generator).floor()
    sizes = torch.tensor(grid, dtype=torch.float32)
    extents = extents.round().clamp(min=torch.ones(k), max=sizes).long()
    lo = (torch.rand(batch, k, generator=generator) * (sizes.long() - extents + 1)).floor().long()
    return lo, lo + extents


def _inside(pos: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return ((pos >= lo[:, None]) & (pos < hi[:, None])).all(-1)


class RandomMasker:
    """Uniformly random tokens (MAE).

    Args:
        ratio: fraction of each sample's real tokens to mask (the shortest sample's count sets the batch's), in [0, 1).

    Raises:
        ArgumentError: ``ratio`` outside [0, 1).
    """

    def __init__(self, ratio: float = 0.75) -> None:
        _check_ratio(ratio)
        self.ratio = ratio

    def __call__(self, tokens: Tokens, generator: torch.Generator) -> Mask:
        valid = tokens.valid()
        n_vis, n_tgt = _split_ratio(int(_counts(tokens).min()), self.ratio)
        noise = torch.rand(valid.shape, generator=generator, device=generator.device).to(valid.device)
        order = noise.masked_fill(~valid, _PAD).argsort(dim=1, stable=True)
        return Mask(order[:, :n_vis], order[:, n_vis:n_vis + n_tgt])


class BlockMasker:
    """Rectangles (2-D) or boxes (3-D) of neighbouring tokens (BEiT/SimMIM-style blockwise).

    Args:
        ratio: fraction of real tokens to mask, in [0, 1).
        block_scale: range of each block's share of the grid's (last two axes') area, within (0, 1].
        aspect: range of a block's height/width ratio (positive).
        max_blocks: most blocks drawn per batch (at least 1).

    Raises:
        ArgumentError: an argument outside its range.
    """

    def __init__(self, ratio: float = 0.6, block_scale: tuple[float, float] = (0.05, 0.3),
                 aspect: tuple[float, float] = (0.3, 3.3), max_blocks: int = 64) -> None:
        _check_ratio(ratio)
        _check_span("block_scale", block_scale, _SHARE)
        _check_span("aspect", aspect, _ASPECT)
        _check("max_blocks", max_blocks, _COUNT)
        self.ratio, self.block_scale, self.aspect, self.max_blocks = ratio, tuple(block_scale), tuple(aspect), max_blocks

    def __call__(self, tokens: Tokens, generator: torch.Generator) -> Mask:
        grid = _grid_of(tokens)
        valid = tokens.valid()
        n_vis, n_tgt = _split_ratio(int(_counts(tokens).min()), self.ratio)
        pos = tokens.pos.cpu()
        masked = torch.zeros(valid.shape, dtype=torch.bool)
        valid_cpu = valid.cpu()
        for _ in range(self.max_blocks):
            if bool(((masked & valid_cpu).sum(1) >= n_tgt).all()):
                break
            lo, hi = _sample_boxes(grid, len(pos), self.block_scale, self.aspect, generator, span_leading=False)
            need = (masked & valid_cpu).sum(1) < n_tgt  # only samples still short of their count grow
            masked |= _inside(pos, lo, hi) & need[:, None]
        # visible: unmasked first; the target count is met from blocks, topped up at random
        priority = torch.rand(valid.shape, generator=generator) + masked.float()
        visible = _take(priority, valid_cpu, 0, n_vis)
        target = _take(-priority, valid_cpu, 0, n_tgt)
        return Mask(visible.to(valid.device), target.to(valid.device))


class TubeMasker:
    """The same spatial mask at every time step (VideoMAE's tube masking).

    The first grid axis is time; a spatial cell is masked at all time steps or at none.

    Args:
        ratio: fraction of spatial cells (hence of tokens) to mask, in [0, 1).

    Raises:
        ArgumentError: ``ratio`` outside [0, 1).
    """

    def __init__(self, ratio: float = 0.9) -> None:
        _check_ratio(ratio)
        self.ratio = ratio

    def __call__(self, tokens: Tokens, generator: torch.Generator) -> Mask:
        grid = _grid_of(tokens)
        if len(grid) < 2:
            raise ValueError(f"tube masking needs a grid with a time axis and space, got grid {grid}")
        spatial = grid[1:]
        n_cells = math.prod(spatial)
        strides = torch.tensor([math.prod(spatial[i + 1:]) for i in range(len(spatial))], device=tokens.pos.device)
        cell = (tokens.pos[..., 1:].long() * strides).sum(-1)
        score = torch.rand(tokens.batch_size, n_cells, generator=generator, device=generator.device).to(cell.device)
        valid = tokens.valid()
        cells_real = int(_counts(tokens).min()) // grid[0]
        n_cells_masked = min(int(round(self.ratio * cells_real)), max(cells_real - 1, 0))
        per_cell = grid[0]
        n_vis = (cells_real - n_cells_masked) * per_cell
        n_tgt = n_cells_masked * per_cell
        order = _take(torch.gather(score, 1, cell), valid, 0, valid.shape[1])
        return Mask(order[:, :n_vis], order[:, n_vis:n_vis + n_tgt])


def _nearest_block(pos: Tensor, valid: Tensor, share: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Per sample, the ``share`` (drawn in the range) of real tokens nearest a random real seed token."""
    b, n = valid.shape
    size = (_uniform(*share, b, generator) * valid.sum(1)).round().clamp(min=1)
    seed = (torch.rand(b, n, generator=generator) + _LAST * (~valid).float()).argmin(1)
    dist = (pos - pos[torch.arange(b), seed].unsqueeze(1)).norm(dim=-1).masked_fill(~valid, float("inf"))
    rank = dist.argsort(dim=1, stable=True).argsort(dim=1)
    return rank < size.unsqueeze(1)


class MultiBlockMasker:
    """I-JEPA / V-JEPA context and target blocks.

    Several target blocks are sampled; the context is one large block with the targets removed.
    Blocks span the whole time axis of 3-D grids (V-JEPA). On continuous positions (point groups,
    Point-JEPA) a block is the share of tokens nearest a random seed token. Counts are truncated to the batch's
    smallest so shapes stay static.

    Args:
        num_targets: target blocks per sample (at least 1).
        target_scale: range of each target block's share of the (spatial) grid, within (0, 1].
        target_aspect: range of target height/width ratios (positive).
        context_scale: range of the context block's share of the grid, within (0, 1].
        min_context: fewest context tokens accepted before the sample is redrawn (at least 1).
        max_tries: redraws before giving up (at least 1).

    Raises:
        ArgumentError: an argument outside its range.
    """

    def __init__(self, num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                 target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                 min_context: int = 4, max_tries: int = 20) -> None:
        for argument, value in (("num_targets", num_targets), ("min_context", min_context), ("max_tries", max_tries)):
            _check(argument, value, _COUNT)
        _check_span("target_scale", target_scale, _SHARE)
        _check_span("target_aspect", target_aspect, _ASPECT)
        _check_span("context_scale", context_scale, _SHARE)
        self.num_targets, self.target_scale, self.target_aspect = num_targets, tuple(target_scale), tuple(target_aspect)
        self.context_scale, self.min_context, self.max_tries = tuple(context_scale), min_context, max_tries

    def _draw(self, pos: Tensor, grid: tuple[int, ...], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        batch = len(pos)
        target = torch.zeros(pos.shape[:2], dtype=torch.bool)
        for _ in range(self.num_targets):
            lo, hi = _sample_boxes(grid, batch, self.target_scale, self.target_aspect, generator, span_leading=True)
            target |= _inside(pos, lo, hi)
        lo, hi = _sample_boxes(grid, batch, self.context_scale, (1.0, 1.0), generator, span_leading=True)
        return _inside(pos, lo, hi) & ~target, target

    def _draw_balls(self, pos: Tensor, valid: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        target = torch.zeros(pos.shape[:2], dtype=torch.bool)
        for _ in range(self.num_targets):
            target |= _nearest_block(pos, valid, self.target_scale, generator)
        return _nearest_block(pos, valid, self.context_scale, generator) & ~target, target

    def __call__(self, tokens: Tokens, generator: torch.Generator) -> Mask:
        valid = tokens.valid().cpu()
        if tokens.pos.is_floating_point() and tokens.grid is None:
            # continuous positions (point groups): a block is the tokens nearest a random seed token
            pos = tokens.pos.detach().cpu().float()
            grid = None
            draw = lambda: self._draw_balls(pos, valid, generator)  # noqa: E731
        else:
            grid = _grid_of(tokens)
            pos = tokens.pos.cpu().long()
            draw = lambda: self._draw(pos, grid, generator)  # noqa: E731
        context, target = draw()
        for _ in range(self.max_tries):
            bad = ((context & valid).sum(1) < self.min_context) | ((target & valid).sum(1) == 0)
            if not bool(bad.any()):
                break
            c, t = draw()
            context[bad], target[bad] = c[bad], t[bad]
        else:
            raise ValueError(f"multiblock masking found no context of {self.min_context}+ tokens in {self.max_tries} "
                             f"tries on {'grid ' + str(grid) if grid else 'continuous positions'}; lower target_scale or num_targets")
        context &= valid
        target &= valid
        n_vis, n_tgt = int(context.sum(1).min()), int(target.sum(1).min())
        noise = torch.rand(valid.shape, generator=generator)
        device = tokens.x.device
        visible = _take(noise + _LAST * (~context).float(), valid, 0, n_vis)
        chosen = _take(noise + _LAST * (~target).float(), valid, 0, n_tgt)
        return Mask(visible.to(device), chosen.to(device))
