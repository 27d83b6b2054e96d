"""Compare sharded-dataset libraries (webdataset, mosaicml-streaming, litdata) as storage for anymodal.

For each installed library it converts two anymodal datasets (MNIST images, variable-length lidar sweeps)
into the library's shard format (arrays stored as raw .npy bytes / the library's ndarray encoding, never
pickle) and measures:

  write      seconds, bytes on disk and shard count
  loader     samples/s through a torch DataLoader (2 workers) after warm-up, vs the in-memory dataset
  resume     stop after N batches, restart from the state (webdataset: replay + skip) and compare order
  order      epoch order with 1 vs 2 workers; world size 2 (2 gloo processes) vs 1; resume at another world size
  random     map-style ``ds[i]`` at random global indices (samples/s), if supported
  mix        weighted mixing of two sources (0.7 / 0.3): realised share and exact resume

Usage (inside a venv with the libraries installed):  python benchmarks/shard_libraries.py --out results.json
A library that is not installed is skipped with a note. Every test is guarded: a failure is recorded as text.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

B_OFFSET = 1_000_000  # idx offset of the second mixing source


# ----------------------------------------------------------------------------------------------- data
def anymodal_dataset(name: str, n: int):
    from anymodal.plugins.manager import load_components
    c = load_components()
    if name == "mnist":
        return c.dataset.build("mnist", split="train", limit=n)
    return c.dataset.build("lidar_sweeps", split="train", size=n)


def to_numpy(i: int, s: dict) -> dict:
    out = {"idx": i}
    for k, v in s.items():
        out[k] = v.numpy() if isinstance(v, torch.Tensor) else v
    return out


def collate(samples: list) -> dict:
    """Stack same-shape arrays, keep variable-length ones (lidar points) as a list."""
    out = {}
    for k in samples[0]:
        vs = [s[k] for s in samples]
        if isinstance(vs[0], (np.ndarray, torch.Tensor)):
            vs = [torch.as_tensor(v) for v in vs]
            out[k] = torch.stack(vs) if all(v.shape == vs[0].shape for v in vs) else vs
        elif isinstance(vs[0], (int, np.integer)):
            out[k] = torch.tensor([int(v) for v in vs])
        else:
            out[k] = vs
    return out


def dir_bytes(path: str) -> tuple[int, int]:
    files = [f for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f)]
    shards = [f for f in files if not f.endswith(".json")]
    return sum(os.path.getsize(f) for f in files), len(shards)


# ------------------------------------------------------------------------------------------ adapters
class WebDatasetLib:
    name, module = "webdataset", "webdataset"
    has_state = False  # no state_dict: resume = rebuild with the same seed and skip N batches

    def write(self, samples, out, shard_bytes):
        import webdataset as wds
        with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxsize=shard_bytes, maxcount=10**9,
                             verbose=0) as w:
            for s in samples:
                rec = {"__key__": f"{s['idx']:09d}"}
                for k, v in s.items():  # extension picks the encoder: .npy raw numpy, .cls int, .txt str
                    ext = "npy" if isinstance(v, np.ndarray) else "cls" if isinstance(v, int) else "txt"
                    rec[f"{k}.{ext}"] = v
                w.write(rec)

    def dataset(self, paths, seed, batch, weights=None):
        import webdataset as wds

        def one(path):
            urls = sorted(glob.glob(os.path.join(path, "*.tar")))
            return (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=wds.split_by_node,
                                   empty_check=False)
                    .decode().map(_strip_wds).shuffle(1000, seed=seed))
        if weights is None:
            return one(paths[0])
        return wds.RandomMix([one(p) for p in paths], probs=weights)

    def loader(self, ds, batch, workers, seed):
        return DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                          generator=torch.Generator().manual_seed(seed))

    def getitem(self, ds, i):
        raise NotImplementedError("IterableDataset only (wids random access not shipped in webdataset 1.x)")


def _strip_wds(s):
    return {k.split(".")[0]: v for k, v in s.items() if not k.startswith("__")}


class StreamingLib:
    name, module = "mosaicml-streaming", "streaming"
    has_state = True

    def __init__(self):
        from streaming.base.util import clean_stale_shared_memory
        clean_stale_shared_memory()

    def write(self, samples, out, shard_bytes):
        from streaming import MDSWriter
        cols = {}
        for k, v in samples[0].items():
            if isinstance(v, np.ndarray):
                fixed = all(s[k].shape == v.shape for s in samples)  # variable shapes: dynamic ndarray
                cols[k] = f"ndarray:{v.dtype}" + (":" + ",".join(map(str, v.shape)) if fixed else "")
            else:
                cols[k] = "int" if isinstance(v, int) else "str"
        with MDSWriter(out=out, columns=cols, size_limit=shard_bytes, compression=None) as w:
            for s in samples:
                w.write(s)

    def dataset(self, paths, seed, batch, weights=None):
        from streaming import Stream, StreamingDataset
        gc.collect()  # a dead dataset still holds its local dir in shared memory until collected
        kw = dict(shuffle=True, shuffle_seed=seed, batch_size=batch, num_canonical_nodes=2)
        if weights is None:
            return StreamingDataset(local=paths[0], **kw)
        return StreamingDataset(streams=[Stream(local=p, proportion=w) for p, w in zip(paths, weights)], **kw)

    def loader(self, ds, batch, workers, seed):
        from streaming import StreamingDataLoader
        return StreamingDataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)

    def getitem(self, ds, i):
        return ds[i]


class LitDataLib:
    name, module = "litdata", "litdata"
    has_state = True

    def write(self, samples, out, shard_bytes):
        from litdata.streaming.writer import BinaryWriter
        w = BinaryWriter(cache_dir=out, chunk_bytes=shard_bytes)  # numpy arrays: NumpySerializer, no pickle
        for s in samples:
            w.add_item(s["idx"] % B_OFFSET, s)
        w.done()
        w.merge(num_workers=1)

    def dataset(self, paths, seed, batch, weights=None):
        from litdata import CombinedStreamingDataset, StreamingDataset
        if weights is None:
            return StreamingDataset(paths[0], shuffle=True, seed=seed)
        return CombinedStreamingDataset([StreamingDataset(p, shuffle=True, seed=seed) for p in paths],
                                        seed=seed, weights=weights, iterate_over_all=False)

    def loader(self, ds, batch, workers, seed):
        from litdata import StreamingDataLoader
        return StreamingDataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                                   generator=torch.Generator().manual_seed(seed))

    def getitem(self, ds, i):
        return ds[i]


LIBS = [WebDatasetLib, StreamingLib, LitDataLib]


# --------------------------------------------------------------------------------------------- tests
def guarded(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:  # record and continue: one library's failure must not stop the others
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def throughput(loader, warmup: int) -> dict:
    n, t0, first = 0, time.perf_counter(), None
    for b, batch in enumerate(loader):
        if b == 0:
            first = time.perf_counter() - t0
        if b == warmup:
            n, t1 = 0, time.perf_counter()
        n += len(batch["label"])
    dt = time.perf_counter() - t1
    return {"samples_per_s": round(n / dt, 1), "first_batch_s": round(first, 2), "timed_samples": n}


def idx_of(batches) -> list[list[int]]:
    return [[int(x) for x in b["idx"]] for b in batches]


def epoch(lib, paths, seed, batch, workers, weights=None, state=None):
    ds = lib.dataset(paths, seed, batch, weights)
    dl = lib.loader(ds, batch, workers, seed)
    if state is not None:
        dl.load_state_dict(state)
    return idx_of(dl)


def _rank_main(rank, world, port, lib_name, path, seed, batch, state, out):
    os.environ.update(RANK=str(rank), GLOBAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lib = next(c for c in LIBS if c.name == lib_name)()
        res = epoch(lib, [path], seed, batch, 2, state=state)
    except Exception as e:
        res = f"{type(e).__name__}: {str(e)[-300:]}"
    with open(out, "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


def rank_epochs(lib, path, seed, batch, world=2, state=None) -> list:
    """One epoch per simulated rank: `world` concurrent processes joined by a gloo process group."""
    ctx = torch.multiprocessing.get_context("spawn")
    port, outs = random.randrange(20000, 40000), [tempfile.mktemp(suffix=".json") for _ in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, lib.name, path, seed, batch, state, outs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    res = [json.load(open(o)) for o in outs]
    for r in res:
        if isinstance(r, str):
            raise RuntimeError(r)
    return res


def resume(lib, paths, seed, batch, workers, stop, weights=None) -> dict:
    ds = lib.dataset(paths, seed, batch, weights)
    dl = lib.loader(ds, batch, workers, seed)
    seen, state = [], None
    for b in dl:
        seen.append([int(x) for x in b["idx"]])
        if len(seen) == stop and lib.has_state:
            state = dl.state_dict()
    del dl, ds
    rest = seen[stop:]
    if lib.has_state:
        got = epoch(lib, paths, seed, batch, workers, weights, state=state)
        how = "state_dict/load_state_dict"
    else:
        got = epoch(lib, paths, seed, batch, workers, weights)[stop:]
        how = "replay with same seed, skip N batches (reads and discards them)"
    flat_r, flat_g = sum(rest, []), sum(got, [])
    return {"method": how, "stop_batch": stop, "exact": got == rest, "expected_batches": len(rest),
            "got_batches": len(got), "same_sample_set": sorted(flat_r) == sorted(flat_g),
            "state_keys": sorted(state) if isinstance(state, dict) else None}


def order_tests(lib, path, seed, batch, n) -> dict:
    res = {}
    w1, w2 = epoch(lib, [path], seed, batch, 1), epoch(lib, [path], seed, batch, 2)
    res["same_order_1_vs_2_workers"] = w1 == w2
    res["same_set_1_vs_2_workers"] = sorted(sum(w1, [])) == sorted(sum(w2, []))
    # world size 2 (per-rank batch B) vs world size 1 (batch 2B): compare the samples of each global step
    g1 = epoch(lib, [path], seed, 2 * batch, 2)
    ranks = rank_epochs(lib, path, seed, batch)
    flat = sum(ranks[0], []) + sum(ranks[1], [])
    steps = [sorted(a + b) for a, b in zip(*ranks)]
    res["world2_samples"] = len(flat)
    res["world2_unique"] = len(set(flat))
    res["world2_missing_of_%d" % n] = n - len(set(flat))
    res["same_global_steps_world1_vs_world2"] = steps == [sorted(s) for s in g1[:len(steps)]]
    if lib.has_state:
        res["resume_world1_to_world2"] = guarded(resume_other_world, lib, path, seed, batch)
    return res


def resume_other_world(lib, path, seed, batch, stop=10) -> dict:
    """Stop a world-1 run (batch 2B) after `stop` steps, resume as two ranks of batch B."""
    ds = lib.dataset([path], seed, 2 * batch)
    dl = lib.loader(ds, 2 * batch, 2, seed)
    seen, state = [], None
    for b in dl:
        seen.append([int(x) for x in b["idx"]])
        if len(seen) == stop:
            state = dl.state_dict()
    del dl, ds
    rest = sum(seen[stop:], [])
    got = sum((sum(r, []) for r in rank_epochs(lib, path, seed, batch, state=state)), [])
    return {"expected": len(rest), "got": len(got), "repeated": len(got) - len(set(got)),
            "skipped": len(set(rest) - set(got)), "extra": len(set(got) - set(rest))}


def random_access(get, n_total, k, seed=0) -> dict:
    rng = random.Random(seed)
    ids = [rng.randrange(n_total) for _ in range(k)]
    get(ids[0])  # open / index the shards
    t = time.perf_counter()
    for i in ids:
        get(i)
    return {"samples_per_s": round(k / (time.perf_counter() - t), 1), "reads": k}


def mixing(lib, paths, seed, batch, weights) -> dict:
    got = sum(epoch(lib, paths, seed, batch, 2, weights), [])
    share_b = sum(i >= B_OFFSET for i in got) / max(len(got), 1)
    return {"weights": weights, "samples_per_epoch": len(got), "share_b": round(share_b, 3),
            "resume": guarded(resume, lib, paths, seed, batch, 2, 20, weights)}


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--work", default=None, help="shard directory (default: a temporary one, removed)")
    ap.add_argument("--mnist", type=int, default=20000)
    ap.add_argument("--lidar", type=int, default=400)
    ap.add_argument("--shard-mb", type=float, default=8.0, help="shard size target (64 gives 1-3 shards here)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--libs", default="webdataset,mosaicml-streaming,litdata")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="shards-")
    shard_bytes = int(args.shard_mb * 2**20)
    sets = {"mnist": (args.mnist, 64), "lidar": (args.lidar, 16)}
    results = {"torch": torch.__version__, "numpy": np.__version__, "args": vars(args), "baseline": {}, "libs": {}}

    data, samples = {}, {}
    for name, (n, batch) in sets.items():
        data[name] = anymodal_dataset(name, n)
        samples[name] = [to_numpy(i, data[name][i]) for i in range(len(data[name]))]
        base = DataLoader(data[name], batch_size=batch, shuffle=True, num_workers=args.workers, collate_fn=collate)
        results["baseline"][name] = {
            "loader": throughput(base, warmup=5 if name == "mnist" else 3),
            "random_access": random_access(data[name].__getitem__, n, 2000 if name == "mnist" else 200)}
        print(name, "in-memory baseline", results["baseline"][name], flush=True)
    mix_b = [dict(s, idx=s["idx"] + B_OFFSET) for s in samples["mnist"][:args.mnist // 4]]

    for cls in LIBS:
        if cls.name not in args.libs.split(","):
            continue
        if importlib.util.find_spec(cls.module) is None:
            print(f"note: {cls.name} is not installed; skipped", flush=True)
            results["libs"][cls.name] = {"skipped": "not installed"}
            continue
        lib, r = cls(), {}
        version = __import__(cls.module).__version__
        r["version"] = version
        for name, (n, batch) in sets.items():
            path = os.path.join(work, cls.module, name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            t = time.perf_counter()
            lib.write(samples[name], path, shard_bytes)
            dt = time.perf_counter() - t
            size, count = dir_bytes(path)
            r[name] = {"write": {"seconds": round(dt, 2), "samples_per_s": round(n / dt, 1),
                                 "bytes": size, "shards": count}}
            ds = lib.dataset([path], args.seed, batch)
            r[name]["loader"] = guarded(throughput, lib.loader(ds, batch, args.workers, args.seed),
                                        5 if name == "mnist" else 3)
            del ds
            r[name]["random_access"] = guarded(
                lambda: random_access(lambda i, d=lib.dataset([path], args.seed, batch): lib.getitem(d, i),
                                      n, 2000 if name == "mnist" else 200))
            r[name]["resume"] = guarded(resume, lib, [path], args.seed, batch, args.workers,
                                        20 if name == "mnist" else 5)
            if name == "mnist":
                r[name]["order"] = guarded(order_tests, lib, path, args.seed, batch, n)
            print(cls.name, name, json.dumps(r[name], default=str)[:1500], flush=True)
        pb = os.path.join(work, cls.module, "mnist_b")
        shutil.rmtree(pb, ignore_errors=True)
        os.makedirs(pb)
        lib.write(mix_b, pb, shard_bytes)
        r["mix"] = guarded(mixing, lib, [os.path.join(work, cls.module, "mnist"), pb], args.seed, 64, [0.7, 0.3])
        print(cls.name, "mix", json.dumps(r["mix"], default=str)[:800], flush=True)
        results["libs"][cls.name] = r

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
