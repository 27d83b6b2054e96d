"""Weighted mixing of datasets (``data.mix``) that keeps the order a function of the seed and the step.

An epoch of the mix has ``M`` samples (the sources' total); source ``k`` fills ``n_k`` of them,
its weight's share of ``M`` rounded by largest remainder, so the realised proportions are the
weights' to within one sample per epoch. Each source is read as an endless stream of its own
seeded permutations: mix epoch ``e`` takes positions ``[e * n_k, (e + 1) * n_k)`` of it, so a source
weighted above its size repeats (each pass augmented afresh) and one below it moves on through its
samples from epoch to epoch. A seeded shuffle of the ``M`` slots interleaves the sources. Every
epoch is computed from ``(seed, epoch)`` alone: resuming at any step is exact. Each sample carries
its source number (``mix_source``), from which the trainer logs the proportions realised.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import mix_seed
from .errors import DataError

__all__ = ["MixDataset", "apportion", "SOURCE_FIELD"]

SOURCE_FIELD = "mix_source"  # each sample's source number: the trainer counts the realised proportions


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the earlier source)."""
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[:total - sum(counts)]:
        counts[k] += 1
    return counts


class MixDataset:
    """Several datasets as one, drawn in proportion to ``weights`` (see the module docstring).

    Args:
        sources: ``(label, dataset)`` pairs; the label names the source in logs and metrics.
        weights: one positive weight per source (normalised here).
    """

    def __init__(self, sources: Sequence[tuple[str, Any]], weights: Sequence[float]) -> None:
        if not sources or len(sources) != len(weights):
            raise ValueError("data.mix needs one weight per source, and at least one source")
        self.labels = [label for label, _ in sources]
        self.datasets = [dataset for _, dataset in sources]
        self.lengths = [len(d) for d in self.datasets]
        empty = [label for label, n in zip(self.labels, self.lengths) if n == 0]
        if empty:
            raise ValueError(f"data.mix source(s) {', '.join(empty)} hold no samples")
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.starts = [0]
        for n in self.lengths:
            self.starts.append(self.starts[-1] + n)
        self.per_epoch = apportion(self.starts[-1], self.weights)
        _check_alike(self.labels, self.datasets)
        self.skipped = [(f"{label}: {path}", why) for label, d in sources for path, why in getattr(d, "skipped", ())]

    def __len__(self) -> int:
        return self.starts[-1]

    def _source(self, index: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, index) - 1
        return k, index - self.starts[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, i = self._source(index)
        return {**self.datasets[k][i], SOURCE_FIELD: k}

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        k, i = self._source(index)
        dataset = self.datasets[k]
        return {**(dataset.sample(i, generator) if hasattr(dataset, "sample") else dataset[i]), SOURCE_FIELD: k}

    def _pass_order(self, k: int, seed: int, p: int) -> Tensor:
        """Pass ``p`` through source ``k``: its own epoch order where it has one (a shard folder's windows)."""
        dataset = self.datasets[k]
        if hasattr(dataset, "epoch_order"):
            return dataset.epoch_order(mix_seed(seed, k, -8), p)[0]
        return torch.randperm(self.lengths[k], generator=torch.Generator().manual_seed(mix_seed(seed, k, p, -8)))

    def epoch_order(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """Mix epoch ``epoch``: global indices, and each one's pass through its source (the
        augmentation tag: a repeated sample is augmented afresh)."""
        slots = torch.cat([torch.full((n,), k) for k, n in enumerate(self.per_epoch)])
        slots = slots[torch.randperm(len(slots), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, -7)))]
        indices, tags = torch.empty_like(slots), torch.empty_like(slots)
        for k, n in enumerate(self.per_epoch):
            if not n:
                continue
            position = epoch * n + torch.arange(n)
            passes = position // self.lengths[k]
            local = torch.empty_like(position)
            for p in passes.unique().tolist():  # one or a few passes per epoch
                at = passes == p
                perm = self._pass_order(k, seed, p)
                local[at] = perm[position[at] % self.lengths[k]]
            where = slots == k
            indices[where] = local + self.starts[k]
            tags[where] = passes
        return indices, tags


def _layout(sample: dict[str, Any]) -> dict[str, Any]:
    """Field -> what must agree to batch samples together: a tensor's dtype and trailing shape, else the type."""
    return {k: (v.dtype, tuple(v.shape[1:])) if isinstance(v, Tensor) else type(v).__name__ for k, v in sample.items()}


def _check_alike(labels: Sequence[str], datasets: Sequence[Any]) -> None:
    """The sources' first samples batch together (same fields, dtypes, shapes but the first dimension)."""
    first = _layout(datasets[0][0])
    for label, dataset in zip(labels[1:], datasets[1:]):
        other = _layout(dataset[0])
        if other != first:
            differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            detail = "; ".join(f"{k}: {first.get(k, 'missing')} vs {other.get(k, 'missing')}" for k in differ[:4])
            raise DataError(f"data.mix sources {labels[0]!r} and {label!r} give samples that do not batch together "
                            f"({detail}): give every source the same fields and sizes")
