"""``anymodal shards write``: a config's dataset as webdataset shards with a manifest.

The samples are the dataset's own (``dataset[i]``, before any training transform), split into
shards of about ``--shard-size`` bytes, written by ``--workers`` processes. A write is resumable:
each finished shard leaves a small record beside it, and a write started again with the same
source keeps the shards whose records and checksums still match. The manifest is written last,
so a folder with a manifest is a whole one. ``--out`` may be an fsspec URL (``s3://...``): shards
are written to a local staging folder and uploaded as each finishes, the manifest last.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from ..core.build import build_dataset
from ..core.data import cache_dir
from ..core.errors import DataError, UserError
from ..core.runfolder import write_atomic
from ..core.shard_format import FORMAT, MANIFEST, encode_sample, field_spec, index_name, sample_index, shard_name
from ..core.remote_run import is_url
from ..core.shards import ShardStore, sha256_of
from ..plugins.manager import load_components

__all__ = ["write_shards", "parse_size"]

_PLAN = ".plan.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``64MB``, ``512KiB``, ``1e6``-style byte counts; UserError for anything else."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UserError(f"--shard-size {text!r} is not a size in bytes (e.g. 64MB, 512KiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _record(folder: Path, number: int) -> Path:
    return folder / f".{shard_name(number)}.json"


def _write_shard(job: tuple) -> dict:
    """One shard, in a worker process: samples ``[start, stop)`` of the split's dataset."""
    config_yaml, split, number, start, stop, fields, staging, remote = job
    folder = Path(staging)
    cfg = OmegaConf.create(config_yaml)
    dataset = build_dataset(cfg, split, load_components(cfg.plugins))
    path = folder / shard_name(number)

    def write(tmp: Path) -> None:
        # plain ustar (webdataset's layout, without pax headers): half the bytes for small samples
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, stop):
                sample = dataset[index]
                if set(sample) != set(fields):
                    raise DataError(f"sample {index} of data.{split} has fields {sorted(sample)}, the first sample "
                                    f"{sorted(fields)}: shards need every sample to have the same fields")
                for name, data in encode_sample(f"{index:010d}", sample).items():
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o444  # mtime 0: the same source writes the same bytes
                    tar.addfile(info, io.BytesIO(data))

    write_atomic(path, write)
    data = path.read_bytes()
    rows = sample_index(data)
    index = folder / index_name(path.name)

    def save_index(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, rows, allow_pickle=False)

    write_atomic(index, save_index)
    record = {"name": path.name, "samples": stop - start, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "index_bytes": index.stat().st_size, "index_sha256": sha256_of(str(index))}
    if len(rows) != stop - start + 1:
        raise DataError(f"{path} holds {len(rows) - 1} samples, {stop - start} were written: two samples share a key")
    if remote:  # the index first: a shard visible remotely always has its index
        fs = ShardStore(remote).fs
        fs.put_file(str(index), f"{remote.rstrip('/')}/{index.name}")
        fs.put_file(str(path), f"{remote.rstrip('/')}/{path.name}")
    write_atomic(_record(folder, number), lambda tmp: tmp.write_text(json.dumps(record)))
    return record


def _done(folder: Path, number: int) -> Optional[dict]:
    """The record of a shard a previous write finished, if the shard still matches it."""
    try:
        record = json.loads(_record(folder, number).read_text())
        path, index = folder / record["name"], folder / index_name(record["name"])
        if (path.stat().st_size == record["bytes"] and sha256_of(str(path)) == record["sha256"]
                and sha256_of(str(index)) == record["index_sha256"]):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_shards(composed_cfg: Any, out: str, splits: Sequence[str], shard_size: int, workers: int,
                 progress: bool = True) -> list[str]:
    """Write each split's dataset under ``out/<split>``; the folders (or URLs) written."""
    components = load_components(composed_cfg.plugins)
    config_yaml = OmegaConf.to_yaml(composed_cfg, resolve=True)
    written = []
    for split in splits:
        if not composed_cfg.data.get(split):
            raise UserError(f"the config has no data.{split} dataset to write")
        target = f"{out.rstrip('/')}/{split}"
        remote = target if is_url(target) else None
        staging = Path(cache_dir("shards-out", hashlib.sha1(target.encode()).hexdigest()[:16])) if remote else Path(target)
        staging.mkdir(parents=True, exist_ok=True)
        dataset = build_dataset(composed_cfg, split, components)
        total = len(dataset)
        if total < 1:
            raise DataError(f"data.{split} has no samples to write")
        probe = [dataset[i] for i in sorted({round(k * (total - 1) / 7) for k in range(8)})]
        per_sample = sum(sum(512 + math.ceil(len(b) / 512) * 512 for b in encode_sample("0" * 10, s).values()) for s in probe) / len(probe)
        per_shard = max(1, int(shard_size // per_sample))
        source = {"dataset": OmegaConf.to_container(composed_cfg.data[split], resolve=True), "split": split,
                  "modality": composed_cfg.modality.name, "plugins": list(composed_cfg.plugins),
                  "skipped_by_source": len(getattr(dataset, "skipped", ()))}
        plan = {"source": source, "samples": total, "per_shard": per_shard, "fields": field_spec(probe[0])}
        plan_path = staging / _PLAN
        if plan_path.is_file():
            previous = json.loads(plan_path.read_text())
            if previous.get("source") != source or previous.get("samples") != total:
                raise UserError(f"{staging} holds an unfinished write of another source ({previous.get('source')}); "
                                f"remove it, or write to another --out")
            plan = previous  # the same shard boundaries as the interrupted write
        elif (staging / MANIFEST).is_file() or (not remote and any(staging.glob("shard-*.tar"))):
            raise UserError(f"{staging} already holds shards; remove them, or write to another --out")
        write_atomic(plan_path, lambda tmp: tmp.write_text(json.dumps(plan)))
        per_shard, fields = plan["per_shard"], plan["fields"]
        count = math.ceil(total / per_shard)
        records = {n: r for n in range(count) if (r := _done(staging, n))}
        jobs = [(config_yaml, split, n, n * per_shard, min(total, (n + 1) * per_shard), list(fields), str(staging), remote)
                for n in range(count) if n not in records]
        _run(jobs, workers, records, total, per_shard, f"{split}: ", progress)
        manifest = {"format": FORMAT, "samples": total, "fields": fields, "source": source,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "shard_size": shard_size,
                    "shards": [records[n] for n in range(count)]}
        write_atomic(staging / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        if remote:  # last: a remote folder with a manifest is a whole one
            ShardStore(remote).fs.put_file(str(staging / MANIFEST), f"{remote}/{MANIFEST}")
        for n in range(count):
            _record(staging, n).unlink(missing_ok=True)
        plan_path.unlink()
        written.append(target)
    return written


def _run(jobs: list, workers: int, records: dict, total: int, per_shard: int, label: str, progress: bool) -> None:
    from tqdm import tqdm

    done = sum(r["samples"] for r in records.values())
    bar = tqdm(total=total, initial=done, unit="sample", desc=label.rstrip(": "), disable=not progress, file=sys.stderr)
    if workers <= 1 or len(jobs) <= 1:
        results = map(_write_shard, jobs)
        pool = None
    else:  # spawned: each worker builds the dataset itself, no torch state crosses a fork
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap_unordered(_write_shard, jobs)
    try:
        for record in results:
            records[int(record["name"][6:12])] = record
            bar.update(record["samples"])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def cmd_write(args: Any) -> int:
    from .train import load_config

    composed, _ = load_config(args.config, args.overrides)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "test")]
    if bad or not splits:
        raise UserError(f"--split takes train, test or train,test, got {args.split!r}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    for target in write_shards(composed.cfg, args.out, splits, parse_size(args.shard_size), args.workers,
                               progress=not args.quiet):
        print(f"wrote {target}")
    return 0
