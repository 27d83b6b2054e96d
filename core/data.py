"""Batches from datasets: deterministic order and augmentation, so a resumed run sees exactly the
batches the uninterrupted one would have.

Every sample's augmentation draws from a generator seeded by (run seed, epoch, index), and the
order of an epoch is a permutation seeded by (run seed, epoch). A loader is therefore a pure
function of the global step it starts from, whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

__all__ = ["collate", "pad_ragged", "AugmentedDataset", "StepBatchSampler", "make_loader", "mix_seed", "cache_dir",
           "report_skipped"]

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> str:
    """Where generated and fetched data is cached: ``$ANYMODAL_CACHE/<parts>``, else
    ``$XDG_CACHE_HOME/anymodal/<parts>``, else ``~/.cache/anymodal/<parts>``."""
    root = os.environ.get("ANYMODAL_CACHE")
    if root:
        return os.path.join(os.path.expanduser(root), *parts)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "anymodal", *parts)


def report_skipped(skipped: Sequence[tuple[str, str]], base: str, what: str) -> None:
    """Log the unreadable files (path, reason) a dataset's scan under ``base`` left out."""
    if skipped:
        names = ", ".join(p for p, _ in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        log.warning("skipped %d unreadable %s(s) under %s: %s", len(skipped), what, base, names)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts: tensors stack, numbers become tensors, strings become lists.

    Tensors that differ only in their first dimension (point clouds ``[N, C]``, waveforms ``[T]``)
    are variable-length sets: they are zero-padded along it, and ``<key>_padding`` ``[B, N]``
    (True where a slot is padding) is added for the tokenizer.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    fields = set(samples[0])
    for i, sample in enumerate(samples[1:], start=1):
        missing = sorted(fields - set(sample))
        if missing:  # a scene frame missing a sensor: name the frame and the fields
            name = f"frame {sample['frame']!r}" if "frame" in sample else f"sample {i} of the batch"
            raise DataError(f"{name} has other fields than the batch's first sample: missing {', '.join(missing)}")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                out[key] = torch.stack(values)
            elif first.dim() >= 1 and len({shape[1:] for shape in shapes}) == 1:
                out[key], out[f"{key}_padding"] = pad_ragged(values)
            else:
                raise ValueError(f"samples of field {key!r} have different shapes {sorted(shapes)}; "
                                 "resize them in the dataset or use a tokenizer that takes ragged input")
        elif isinstance(first, bool) or not isinstance(first, (int, float)):
            out[key] = list(values)
        else:
            out[key] = torch.tensor(values)
    return out


def pad_ragged(values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad tensors along their first dimension: ``(stacked [B, N, ...], padding [B, N])``."""
    lengths = torch.tensor([v.shape[0] for v in values])
    stacked = torch.nn.utils.rnn.pad_sequence(list(values), batch_first=True)
    padding = torch.arange(stacked.shape[1])[None, :] >= lengths[:, None]
    return stacked, padding


class AugmentedDataset(Dataset):
    """Applies seeded transforms to one field of another dataset's samples.

    Items are addressed by ``(index, epoch)`` so the augmentation of a sample is reproducible.

    Args:
        dataset: the source dataset of sample dicts.
        transforms: callables ``(tensor, generator) -> tensor`` applied in order.
        key: the sample field they apply to.
        seed: the run's seed.
        views: 2 adds ``<key>_view2``, the same sample augmented independently (two-view objectives).
        others: other fields' transforms (a scene's other sensors), field -> transforms, each
            field seeded by a stream of its own; one view each.
    """

    def __init__(self, dataset: Dataset, transforms: Sequence[Callable[[Tensor, torch.Generator], Tensor]],
                 key: str, seed: int, views: int = 1,
                 others: Optional[Mapping[str, Sequence[Callable[[Tensor, torch.Generator], Tensor]]]] = None) -> None:
        if views not in (1, 2):
            raise ValueError(f"data.views must be 1 or 2, got {views}")
        self.dataset, self.transforms, self.key, self.seed, self.views = dataset, list(transforms), key, seed, views
        self.others = {field: list(ts) for field, ts in (others or {}).items() if ts}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def epoch_order(self) -> Optional[Callable[[int, int], tuple[Tensor, Tensor]]]:
        return getattr(self.dataset, "epoch_order", None)  # a mix's weighted epochs

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        return self._augment(self._read(*item), *item)

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """A batch: every sample read first, then every one augmented. Two tight loops, not one
        alternating between decoding and tensor code, keep each warm in the CPU's caches (measured:
        a shard-read MNIST batch in 0.65x the time)."""
        read_many = getattr(self.dataset, "__getitems__", None)
        if read_many is not None and not hasattr(self.dataset, "sample"):
            samples = [dict(s) for s in read_many([index for index, _ in items])]
        else:
            samples = [self._read(*item) for item in items]
        return [self._augment(sample, *item) for sample, item in zip(samples, items)]

    def _read(self, index: int, epoch: int) -> dict[str, Any]:
        if hasattr(self.dataset, "sample"):  # datasets that draw randomness themselves (clip sampling)
            return dict(self.dataset.sample(index, torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, -1))))
        return dict(self.dataset[index])

    def _augment(self, sample: dict[str, Any], index: int, epoch: int) -> dict[str, Any]:
        for number, (field, transforms) in enumerate(self.others.items(), start=1):
            if field not in sample:
                raise KeyError(f"transforms apply to field {field!r}, but the dataset's samples have {sorted(sample)}")
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, 0, number))
            for t in transforms:
                sample[field] = t(sample[field], generator)
        if not self.transforms and self.views == 1:
            return sample
        if self.key not in sample:
            raise KeyError(f"transforms apply to field {self.key!r}, but the dataset's samples have {sorted(sample)}")
        original = sample[self.key]
        for view in range(self.views):
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, view))
            x = original
            for t in self.transforms:
                x = t(x, generator)
            sample[self.key if view == 0 else f"{self.key}_view2"] = x
        return sample


class StepBatchSampler(Sampler):
    """Endless batches of ``(index, epoch)``: each epoch a seeded permutation cut into full
    batches (the remainder is dropped), starting at global batch number ``start_step``.

    Under torch.distributed each rank takes its share ``[rank::world]`` of every global batch, so
    the ranks together see exactly the batches one process would, and resume stays exact.

    ``order(seed, epoch) -> (indices, tags)`` replaces the permutation (a `MixDataset`'s weighted
    epochs): the batch items are then ``(index, tag)``, ``tag`` seeding the sample's augmentation.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1, order: Optional[Callable[[int, int], tuple[Tensor, Tensor]]] = None) -> None:
        # a batch size below 1 would make an epoch of no batches, and iteration would spin forever
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"the batch size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} processes")
        if num_samples < batch_size:
            raise DataError(f"the dataset has {num_samples} samples, fewer than one batch of {batch_size} "
                            "(data.batch_size, or the stage's batch_size): lower it or use more samples")
        if batch_size % world:
            raise DataError(f"the batch size ({batch_size}) is the global batch: it must divide evenly over "
                             f"{world} processes")
        self.num_samples, self.batch_size, self.seed, self.start_step = num_samples, batch_size, seed, start_step
        self.rank, self.world, self.order = rank, world, order
        self.batches_per_epoch = num_samples // batch_size

    def _epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        if self.order is not None:
            return self.order(self.seed, epoch)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g), torch.full((self.num_samples,), epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_step, self.batches_per_epoch)
        while True:
            indices, tags = self._epoch(epoch)
            for b in range(offset, self.batches_per_epoch):
                part = slice(b * self.batch_size, (b + 1) * self.batch_size)
                chunk, chunk_tags = indices[part][self.rank::self.world], tags[part][self.rank::self.world]
                yield list(zip(chunk.tolist(), chunk_tags.tolist()))
            epoch, offset = epoch + 1, 0


def make_loader(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
                pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """An endless loader over an `AugmentedDataset`, positioned at ``start_step``; this rank's
    share of each global batch of ``batch_size``."""
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world,
                                       getattr(dataset, "epoch_order", None)),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator, so creating the loader never draws from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
    )
