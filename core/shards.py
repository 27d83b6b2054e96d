"""Shard folders as map-style datasets: random access by global sample index.

The order of a run stays anymodal's (`StepBatchSampler`: a function of the seed and the step,
whatever the ranks and workers), so a shard dataset only has to answer ``dataset[i]``: the manifest
maps ``i`` to a shard and a sample in it, the shard's index to a byte range, and one ``os.pread``
reads it (a file cut short under a running job is then a DataError, not a crash). A folder at an fsspec URL
(``s3://bucket/prefix``) is read the same way from a local copy of each shard, fetched on first use
and checked against the manifest's SHA-256.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .data import cache_dir, mix_seed, report_skipped
from .errors import DataError
from .remote_run import is_url
from .shard_format import MANIFEST, check_manifest, decode_member, index_name, sample_digest, sample_members

__all__ = ["ShardDataset", "ShardStore", "sha256_of"]

log = logging.getLogger(__name__)
_OPEN_SHARDS = 128  # shards one process keeps open, with their indices (above the default window)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardStore:
    """Where a shard folder lives: a local folder, or an fsspec URL with a local cache of its shards.

    Credentials for object storage come from the usual places (``AWS_*`` variables, ``~/.aws``) or
    ``storage_options``; they are never logged.
    """

    def __init__(self, root: str, cache: Optional[str] = None, storage_options: Optional[dict] = None) -> None:
        self.root = str(root).rstrip("/")
        self.remote = is_url(self.root)
        self.storage_options = dict(storage_options or {})
        self.cache = cache or (cache_dir("shards", hashlib.sha1(self.root.encode()).hexdigest()[:16]) if self.remote else None)
        self._fs, self._fs_pid = None, None

    @property
    def fs(self) -> Any:
        if self._fs is None or self._fs_pid != os.getpid():  # fsspec's clients are not fork-safe: one per process
            try:
                import fsspec
            except ImportError:
                raise DataError(f"reading shards at {self.root} needs fsspec (and s3fs for s3://): "
                                "pip install 'anymodal[shards]'") from None
            try:
                self._fs, _ = fsspec.core.url_to_fs(self.root, skip_instance_cache=True, **self.storage_options)
            except (ImportError, ValueError) as e:
                raise DataError(f"cannot open {self.root}: {e}") from None
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:  # loader workers open their own connection
        return {**self.__dict__, "_fs": None, "_fs_pid": None}

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_text(self, name: str) -> str:
        where = self.url(name)
        try:
            if not self.remote:
                return Path(where).read_text()
            with self.fs.open(where, "rb") as f:
                return f.read().decode()
        except FileNotFoundError:
            raise DataError(f"no {name} at {self.root}: not a shard folder (write one with `anymodal shards write`)") from None
        except Exception as e:  # the storage client's own errors (no endpoint, no bucket, refused credentials)
            raise DataError(f"cannot read {where}: {_reason(e)}") from None

    def sizes(self) -> dict[str, int]:
        """Shard file name -> size in bytes, one listing."""
        try:
            if not self.remote:
                return {e.name: e.stat().st_size for e in os.scandir(self.root) if e.is_file()}
            return {Path(e["name"]).name: int(e["size"]) for e in self.fs.ls(self.root, detail=True)
                    if e.get("type") == "file"}
        except Exception as e:
            raise DataError(f"cannot list {self.root}: {_reason(e)}") from None

    def local(self, name: str, sha256: str) -> str:
        """A local path holding shard ``name``: the folder's own file, or, for a remote folder, the
        cache's copy (fetched and checked against ``sha256`` first when it is not there)."""
        if not self.remote:
            return os.path.join(self.root, name)
        path = os.path.join(self.cache, name)
        if os.path.isfile(path):
            return path
        os.makedirs(self.cache, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.fs.get_file(self.url(name), tmp)
            if sha256_of(tmp) != sha256:  # always: a fetch is where a shard gets damaged
                raise DataError(f"shard {self.url(name)} does not match the manifest's SHA-256: it changed after "
                                "it was written; write the shards again, or restore that object")
            os.replace(tmp, path)  # whole files only: workers fetching the same shard race harmlessly
        except FileNotFoundError:
            raise DataError(f"shard {self.url(name)} is gone (it was listed when the run started)") from None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot fetch shard {self.url(name)}: {_reason(e)}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

class ShardDataset:
    """The samples of a shard folder (``anymodal shards write``), by global index.

    Args:
        path: the folder, or an fsspec URL; ``<path>/<split>`` when that holds a manifest (the
            writer puts each split in a folder of its own).
        split: the config split asking (``train`` or ``test``).
        cache: where a remote folder's shards are kept (default: the anymodal cache).
        verify: check each sample's bytes against its digest in the shard index as it is read
            (shards fetched from a remote folder are always checked whole, against their SHA-256).
        strict: a missing or wrong-sized shard is an error instead of a counted skip.
        storage_options: passed to fsspec (endpoint, profile); prefer environment variables for secrets.
        shuffle_window: shards whose samples are shuffled together (see `epoch_order`).
        id_field: when set, each sample also carries its index in the source dataset under this name
            (its tar key: what the writer read it as).

    Attributes:
        skipped: ``(shard path or URL, reason)`` for every shard left out (missing, or another size than written).
        manifest: the folder's manifest.
    """

    def __init__(self, path: str, split: Optional[str] = None, cache: Optional[str] = None, verify: bool = True,
                 strict: bool = False, storage_options: Optional[dict] = None, id_field: Optional[str] = None,
                 shuffle_window: int = 64) -> None:
        store = ShardStore(path, cache, storage_options)
        if split and _has_manifest(store, split):
            store = ShardStore(store.url(split), cache and os.path.join(cache, split), storage_options)
        if isinstance(shuffle_window, bool) or not isinstance(shuffle_window, int) or not 1 <= shuffle_window <= _OPEN_SHARDS:
            raise ValueError(f"shuffle_window must be a number of shards from 1 to {_OPEN_SHARDS}, got {shuffle_window!r}")
        self.store, self.verify, self.id_field, self.shuffle_window = store, verify, id_field, shuffle_window
        where = store.url(MANIFEST)
        try:
            manifest = json.loads(store.read_text(MANIFEST))
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON: {e}") from None
        self.manifest = check_manifest(manifest, where)
        self.fields = dict(self.manifest["fields"])
        sizes = store.sizes()
        self.shards, self.skipped, counts = [], [], []
        for shard in self.manifest["shards"]:
            found, index = sizes.get(shard["name"]), sizes.get(index_name(shard["name"]))
            problem = ("missing" if found is None else
                       f"{found} bytes, the manifest says {shard['bytes']}" if found != shard["bytes"] else
                       f"without its index {index_name(shard['name'])}" if index is None else
                       f"with an index of {index} bytes, the manifest says {shard['index_bytes']}"
                       if index != shard["index_bytes"] else None)
            if problem:
                if strict:
                    raise DataError(f"shard {store.url(shard['name'])} is {problem} (data.strict is on)")
                self.skipped.append((store.url(shard["name"]), problem))
            elif shard["samples"]:
                self.shards.append(shard)
                counts.append(shard["samples"])
        report_skipped(self.skipped, store.root, "shard")
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)
        if not self.starts[-1]:
            raise DataError(f"no readable samples in the shards at {store.root}")
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._open: OrderedDict[int, tuple[int, list]] = OrderedDict()  # shard -> (fd, its sample index)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.starts[-1]

    def epoch_order(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """Epoch ``epoch``'s order: the shards in a seeded order, cut into windows of
        ``shuffle_window`` shards, the samples of each window shuffled together. At most that
        many shards are open at once (and fetched ahead, for a remote folder). A folder of no more
        shards than the window is shuffled whole, exactly as a map-style dataset of files is."""
        n = len(self)
        if len(self.shards) <= self.shuffle_window:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
            return order, torch.full((n,), epoch)
        shards = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, -9)))
        starts = torch.tensor(self.starts)
        parts = []
        for w, first in enumerate(range(0, len(shards), self.shuffle_window)):
            window = shards[first:first + self.shuffle_window]
            members = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in window.tolist()])
            g = torch.Generator().manual_seed(mix_seed(seed, epoch, w, -10))
            parts.append(members[torch.randperm(len(members), generator=g)])
        return torch.cat(parts), torch.full((n,), epoch)

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number in self.shards, sample number in it)`` of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} samples")
        s = bisect.bisect_right(self.starts, index) - 1
        return s, index - self.starts[s]

    def _shard(self, s: int) -> tuple[int, Any]:
        """Shard ``s`` open, and its sample index (the sidecar, read whole: 16 bytes a sample)."""
        if self._pid != os.getpid():  # a forked worker opens the files itself
            self._reset()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        shard = self.shards[s]
        rows = self._index(shard)
        path = self.store.local(shard["name"], shard["sha256"])
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DataError(f"shard {self.store.url(shard['name'])} is gone (it was listed when the run started)") from None
        except OSError as e:
            raise DataError(f"cannot read shard {self.store.url(shard['name'])}: {e}") from None
        self._open[s] = (fd, rows)
        if len(self._open) > _OPEN_SHARDS:
            os.close(self._open.popitem(last=False)[1][0])
        return fd, rows

    def _index(self, shard: dict) -> Any:
        name = index_name(shard["name"])
        where = self.store.url(name)
        try:
            with open(self.store.local(name, shard["index_sha256"]), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"shard index {where} is gone (it was listed when the run started)") from None
        if len(data) != shard["index_bytes"] or hashlib.sha256(data).hexdigest() != shard["index_sha256"]:
            raise DataError(f"shard index {where} does not match the manifest (size or SHA-256): it changed after it "
                            "was written; write the shards again, or restore that file")
        rows = decode_member("npy", data, where).numpy()
        offsets = rows[:, 0] if rows.ndim == 2 and rows.shape[1] == 2 else None
        if (rows.dtype != np.int64 or offsets is None or len(rows) != shard["samples"] + 1 or offsets[0] != 0
                or (np.diff(offsets) <= 0).any() or offsets[-1] > shard["bytes"]):
            raise DataError(f"shard index {where} is not the index of its shard's {shard['samples']} samples")
        return rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, j = self.locate(index)
        fd, rows = self._shard(s)
        start, end = int(rows[j, 0]), int(rows[j + 1, 0])
        data = bytearray(end - start)  # writable: the sample's tensors are views of it, not copies
        got = os.preadv(fd, [data], start)
        if got != len(data):
            raise DataError(f"{self._where(s, j)} is cut short: the shard ends at byte {start + got}")
        if self.verify and sample_digest(data) != rows[j, 1]:
            raise DataError(f"{self._where(s, j)} does not match its checksum in the shard index: the shard changed "
                            "after it was written; write the shards again, or restore that file")
        key, members = sample_members(memoryview(data), self._where(s, j))
        sample = {field: decode_member(ext, value, lambda: f"{self._where(s, j)} field {field!r}")
                  for field, ext, value in members}
        if len(sample) < len(self.fields):
            missing = sorted(set(self.fields) - set(sample))
            if missing:
                raise DataError(f"{self._where(s, j)} (key {key}) lacks field(s) {', '.join(map(repr, missing))} of "
                                "the manifest")
        if self.id_field:
            sample[self.id_field] = int(key) if key.isdigit() else key
        return sample

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch's samples (the loader's batched fetch: see `AugmentedDataset.__getitems__`)."""
        return [self[i] for i in indices]

    def _where(self, s: int, j: int) -> str:
        return f"{self.store.url(self.shards[s]['name'])} sample {j}"


def _has_manifest(store: ShardStore, split: str) -> bool:
    if not store.remote:
        return os.path.isfile(os.path.join(store.root, split, MANIFEST))
    try:
        return bool(store.fs.exists(store.url(f"{split}/{MANIFEST}")))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot reach {store.root}: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
