"""Shard folders for real: `anymodal shards write` on registered datasets (built-in modalities and an
outside plugin's), training from them as from files, exact order over ranks and loader workers,
weighted mixing, a localhost S3 server, and crafted or damaged shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from anymodal.app.shards import parse_size, write_shards
from anymodal.app.train import load_config
from anymodal.core.errors import DataError, UserError
from anymodal.core.mix import MixDataset, apportion
from anymodal.core.shard_format import MANIFEST
from anymodal.core.shards import ShardDataset
from helpers import anymodal, losses, spawn
from s3_server import make_bucket

DIGITS = "data.train={_replace_: true, name: digits, size: 16}"
SOURCES = {  # a small dataset per built-in modality (and the scenes), as config overrides
    "image": ["tiny-test", DIGITS],
    "video": ["tiny-test", "modality=video", "data.train={_replace_: true, name: moving_digits, size: 6, frames: 8}"],
    "lidar": ["tiny-test", "modality=lidar", "data.train={_replace_: true, name: shapes, size: 6, points: 256}"],
    "lidar_sweep": ["tiny-test", "modality=lidar_sweep",
                    "data.train={_replace_: true, name: lidar_sweeps, size: 3, beams: 8, azimuth_steps: 128}"],
    "audio": ["tiny-test", "modality=audio"],
    "scenes": ["tiny-test", "modality=street_scenes",
               "data.train={_replace_: true, name: street_scenes, size: 2, beams: 8, azimuth_steps: 64, image_size: [32, 64]}"],
}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _check_round_trip(cfg, out: Path) -> None:
    from anymodal.core.build import build_dataset
    from anymodal.plugins.manager import load_components

    source = build_dataset(cfg, "train", load_components(cfg.plugins))
    shards = ShardDataset(str(out), split="train")
    assert len(shards) == len(source)
    for i in range(len(source)):
        want, got = source[i], shards[i]
        assert set(want) == set(got), (i, sorted(want), sorted(got))
        assert all(_same(want[k], got[k]) for k in want), i
    batch = shards.__getitems__(list(range(len(source) - 1, -1, -1)))  # the loader's batched fetch
    assert all(_same(a[k], b[k]) for a, b in zip(batch, reversed([shards[i] for i in range(len(source))])) for k in a)
    manifest = json.loads((out / "train" / MANIFEST).read_text())
    assert manifest["samples"] == len(source) and manifest["source"]["dataset"]["name"] == cfg.data.train.name
    for shard in manifest["shards"]:
        data = (out / "train" / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])


@pytest.mark.parametrize("modality", sorted(SOURCES))
def test_every_modality_writes_and_reads_back_sample_for_sample(modality: str, tmp_path: Path) -> None:
    config, *overrides = SOURCES[modality]
    cfg = load_config(config, overrides)[0].cfg
    write_shards(cfg, str(tmp_path), ["train"], shard_size=32 << 10, workers=1, progress=False)
    _check_round_trip(cfg, tmp_path)


def test_an_outside_plugins_dataset_writes_in_parallel_and_reads_back(tmp_path: Path) -> None:
    """A radar plugin in a module of its own, ragged echoes: written by two processes."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "radar_plugin.py").write_text(textwrap.dedent('''
        import torch
        from anymodal.plugins import hookimpl

        class Echoes:
            def __init__(self, split="train", size=40):
                self.size = size
            def __len__(self):
                return self.size
            def __getitem__(self, i):
                g = torch.Generator().manual_seed(i)
                return {"echo": torch.randn(5 + i % 7, 4, generator=g), "label": i % 3, "text": f"sweep {i}"}

        @hookimpl
        def register_datasets():
            return {"radar_echoes": Echoes}
    '''))
    sys.path.insert(0, str(tmp_path / "pkg"))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "pkg"), old]))  # the spawned writers
    try:
        cfg = load_config("tiny-test", ["plugins=[radar_plugin]", "data.train={_replace_: true, name: radar_echoes}"])[0].cfg
        write_shards(cfg, str(tmp_path / "out"), ["train"], shard_size=4 << 10, workers=2, progress=False)
        assert len(json.loads((tmp_path / "out" / "train" / MANIFEST).read_text())["shards"]) > 2
        _check_round_trip(cfg, tmp_path / "out")
        import webdataset  # the shards are webdataset's layout: its reader takes them as they are

        first = next(iter(webdataset.WebDataset(str(tmp_path / "out" / "train" / "shard-000000.tar"), shardshuffle=False)))
        assert {"echo.npy", "label.json", "text.txt"} <= set(first)
    finally:
        sys.path.remove(str(tmp_path / "pkg"))
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def test_a_killed_write_resumes_to_the_same_shards(tmp_path: Path) -> None:
    args = ["shards", "write", "tiny-test", "--split", "train", "--shard-size", "48KB", "--quiet"]
    anymodal(*args, "--out", tmp_path / "whole", timeout=300)
    proc = spawn(*args, "--out", tmp_path / "killed")
    folder = tmp_path / "killed" / "train"
    deadline = time.monotonic() + 120
    while len(list(folder.glob(".shard-*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / MANIFEST).exists(), "the write finished before it was killed: nothing was tested"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.tar")}
    anymodal(*args, "--out", tmp_path / "killed", timeout=300)
    whole, resumed = (json.loads((f / "train" / MANIFEST).read_text()) for f in (tmp_path / "whole", tmp_path / "killed"))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert sum(p.stat().st_mtime_ns == kept.get(p.name) for p in folder.glob("shard-*.tar")) >= 3  # not written again
    assert not list(folder.glob(".*")), "records or the plan were left behind"
    # another source into the finished folder is refused, naming the folder
    proc = anymodal(*args, "--out", tmp_path / "killed", "modality=lidar", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("anymodal shards: error:"), proc.stderr
    assert "already holds shards" in proc.stderr


def test_size_arguments() -> None:
    assert parse_size("64MB") == 64_000_000 and parse_size("512KiB") == 512 * 1024 and parse_size("100") == 100
    for bad in ("", "-5", "12 parsecs", "0"):
        with pytest.raises(UserError):
            parse_size(bad)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-test's digits (train and test) as shards of ~256 KB (fewer than the shuffle window)."""
    out = tmp_path_factory.mktemp("digit-shards")
    anymodal("shards", "write", "tiny-test", "--out", out, "--shard-size", "256KB", "--workers", "2", "--quiet", timeout=300)
    return out


def _from(path: str) -> list[str]:
    return [f"data.train={{_replace_: true, name: shards, path: '{path}'}}",
            f"data.test={{_replace_: true, name: shards, path: '{path}'}}"]


def test_training_from_shards_is_training_from_files(digit_shards: Path, tmp_path: Path) -> None:
    """Same samples in the same order: the same losses, step for step, and the same probe results."""
    anymodal("train", "tiny-test", "--run-dir", tmp_path / "files", timeout=300)
    anymodal("train", "tiny-test", *_from(str(digit_shards)), "data.num_workers=2", "--run-dir", tmp_path / "shards",
             timeout=300)
    assert losses(tmp_path / "shards") == losses(tmp_path / "files")
    for run in ("files", "shards"):
        anymodal("eval", tmp_path / run, "--no-pictures", timeout=300)
    read = [json.loads((tmp_path / run / "eval" / "results.json").read_text()) for run in ("files", "shards")]
    assert read[0]["results"] == read[1]["results"] and read[0]["test_samples"] == read[1]["test_samples"]


class _Clips:
    """A dataset that draws its own randomness (as clip sampling does): `sample(index, generator)`."""

    def __len__(self) -> int:
        return 8

    def sample(self, index: int, generator: torch.Generator) -> dict:
        return {"video": torch.rand(2, 1, 4, 4, generator=generator) + index}


def test_a_batched_fetch_is_the_samples_fetched_one_by_one(digit_shards: Path) -> None:
    """`AugmentedDataset.__getitems__` (what the loader calls) reads a batch, then augments it: the
    same samples, augmented the same way, as `__getitem__` one at a time; over shards and over a
    dataset that samples clips itself."""
    from anymodal.core.build import build_dataset, build_transforms
    from anymodal.core.data import AugmentedDataset
    from anymodal.plugins.manager import load_components

    cfg = load_config("tiny-test", [*_from(str(digit_shards)), "data.transforms=[{name: random_translate, max_shift: 3}]"])[0].cfg
    components = load_components(cfg.plugins)
    items = [(i, e) for e in (0, 1) for i in (5, 0, 2, 5)]
    for dataset, key in ((build_dataset(cfg, "train", components), "image"), (_Clips(), "video")):
        transforms = build_transforms(cfg, components) if key == "image" else []
        augmented = AugmentedDataset(dataset, transforms, key, seed=3, views=2 if transforms else 1)
        batch, singles = augmented.__getitems__(items), [augmented[item] for item in items]
        assert all(set(a) == set(b) and all(_same(a[k], b[k]) for k in a) for a, b in zip(batch, singles)), key
        assert not torch.equal(batch[0][key], batch[4][key]), key  # another epoch, another draw


ORDER_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from anymodal.core.data import AugmentedDataset, make_loader
from anymodal.core.shards import ShardDataset

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
path, workers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dataset = AugmentedDataset(ShardDataset(path, split="train", id_field="id"), [], "image", seed=5)
runs = {}
for start in (0, 3, 13, 41):  # 42 batches of 32 make an epoch: 41 resumes at the epoch's last step
    loader = make_loader(dataset, 32, seed=5, start_step=start, num_workers=workers, rank=rank, world=world)
    steps = []
    for step, batch in zip(range(start, 50), loader):
        steps.append(batch["id"].tolist())
    runs[start] = steps
gathered = [None] * world
dist.all_gather_object(gathered, runs)
if rank == 0:
    json.dump(gathered, open(out, "w"))
dist.destroy_process_group()
"""


def _order(path: Path, world: int, workers: int, out: Path) -> list[dict[str, list]]:
    script = out.with_suffix(".py")
    script.write_text(ORDER_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                           str(script), str(path), str(workers), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [{int(k): v for k, v in rank.items()} for rank in json.loads(out.read_text())]


def test_order_is_a_function_of_seed_and_step_over_ranks_and_workers(digit_shards: Path, tmp_path: Path) -> None:
    """World size 2 with 2 loader workers per rank, started at step 0 or resumed at 3, 13 and 41:
    every step's sample ids equal the uninterrupted run's, and the ranks' shares together are
    the global batch one process with no workers reads. Resuming at another world size therefore
    neither repeats nor skips a sample within the epoch."""
    two = _order(digit_shards, 2, 2, tmp_path / "two.json")
    one = _order(digit_shards, 1, 0, tmp_path / "one.json")[0]
    for start, steps in one.items():
        assert steps == one[0][start:], f"one process resumed at {start} differs"
        for r in range(2):
            assert two[r][start] == two[r][0][start:], f"rank {r} resumed at {start} differs"
        merged = [sorted(a + b) for a, b in zip(two[0][start], two[1][start])]
        assert merged == [sorted(s) for s in steps], f"two ranks' batches from step {start} are not one process's"
    # 13 steps on two ranks, then the rest of the epoch on one: every sample once
    epoch = [i for s in range(13) for r in range(2) for i in two[r][0][s]] + [i for s in one[13][:42 - 13] for i in s]
    assert len(epoch) == len(set(epoch)) == 42 * 32


def test_mix_proportions_order_and_resume(digit_shards: Path, tmp_path: Path) -> None:
    """Weights 3:1 over the digits from files and from shards: each epoch holds the apportioned
    counts, a source above its size repeats with a new pass tag, the order is a function of
    (seed, epoch), and a run logs each source's share; killed and resumed, it logs the same."""
    from anymodal.plugins.image.data import DigitsDataset

    files, shards = DigitsDataset("train", size=16), ShardDataset(str(digit_shards), split="train")
    mix = MixDataset([("files", files), ("shards", shards)], [3, 1])
    assert mix.per_epoch == apportion(len(files) + len(shards), [3, 1]) == [2021, 673]
    indices, tags = mix.epoch_order(5, 1)
    assert ((indices < len(files)).sum().item(), (indices >= len(files)).sum().item()) == (2021, 673)
    again = mix.epoch_order(5, 1)
    assert torch.equal(indices, again[0]) and torch.equal(tags, again[1])
    # epoch 1 of files: positions 2021..4041 of its stream of 1347-sample passes, so passes 1, 2 and 3
    assert set(tags[indices < len(files)].tolist()) == {1, 2, 3}
    sample = mix[len(files) + 3]
    assert sample["mix_source"] == 1 and _same(sample["image"], shards[3]["image"])

    run = [*_from(str(digit_shards)), "data.mix=[{weight: 3, label: files, name: digits, size: 16}, "
           f"{{weight: 1, label: shards, name: shards, path: '{digit_shards}'}}]", "recipe.stages.pretrain.steps=30"]
    anymodal("train", "tiny-test", *run, "--run-dir", tmp_path / "whole", timeout=300)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["data/mix/files"] for r in records]
    assert all(abs(r["data/mix/files"] + r["data/mix/shards"] - 1) < 1e-6 for r in records)
    assert abs(sum(shares) / len(shares) - 0.75) < 0.05, sum(shares) / len(shares)
    log = (tmp_path / "whole" / "logs" / "anymodal.log").read_text()
    assert "2021 of files (0.750, weight 0.750), 673 of shards (0.250, weight 0.250)" in log
    proc = spawn("train", "tiny-test", *run, "--run-dir", tmp_path / "cut")
    deadline = time.monotonic() + 200
    while not (tmp_path / "cut" / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    anymodal("train", "--resume", "--run-dir", tmp_path / "cut", timeout=300)
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["data/mix/files"]) for r in resumed] == [(r["step"], r["loss"], r["data/mix/files"])
                                                                              for r in records]


def test_window_shuffle_keeps_few_shards_open(digit_shards: Path) -> None:
    """Over more shards than ``shuffle_window``, an epoch is a permutation whose consecutive runs
    come from one window of shards; a folder within the window is shuffled as files are."""
    ds = ShardDataset(str(digit_shards), split="train", shuffle_window=3)
    order, tags = ds.epoch_order(5, 2)
    assert sorted(order.tolist()) == list(range(len(ds))) and set(tags.tolist()) == {2}
    assert torch.equal(order, ds.epoch_order(5, 2)[0]) and not torch.equal(order, ds.epoch_order(5, 3)[0])
    shard_of = [ds.locate(i)[0] for i in order.tolist()]
    windows, seen = [], set()
    for s in shard_of:
        if s not in seen and len(seen) == 3:
            windows.append(seen)
            seen = set()
        seen.add(s)
    assert len(windows) == len(ds.shards) // 3 and all(len(w) == 3 for w in windows)
    whole = ShardDataset(str(digit_shards), split="train")  # 64 shards: more than this folder holds
    sampler_order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(__import__("anymodal").core.data.mix_seed(5, 2)))
    assert torch.equal(whole.epoch_order(5, 2)[0], sampler_order)
    with pytest.raises(ValueError, match="shuffle_window"):
        ShardDataset(str(digit_shards), split="train", shuffle_window=0)


def test_mix_config_errors(tmp_path: Path) -> None:
    cases = {
        "data.mix=[{weight: 0, name: digits}]": "data.mix.0.weight",
        "data.mix=[{weight: 1, name: digitz}]": "did you mean 'digits'",
        "data.mix=[{weight: 1, label: a, name: digits}, {weight: 1, label: a, name: digits}]": "names two sources",
    }
    for override, expected in cases.items():
        proc = anymodal("train", "tiny-test", override, "--run-dir", tmp_path / "run", check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------
# crafted and damaged shard folders


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "train", dst)
    return dst


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_a_changed_byte_is_a_checksum_error_naming_shard_and_sample(digit_shards: Path, tmp_path: Path) -> None:
    folder = _copy(digit_shards, tmp_path / "shards")
    shard = folder / "shard-000002.tar"
    import numpy as np

    data, rows = bytearray(shard.read_bytes()), np.load(folder / "shard-000002.tar.idx.npy")
    for start in rows[1:-1:2, 0]:  # a byte near the end of samples 0, 2, 4, ...: the size is unchanged
        data[start - 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = ShardDataset(str(folder))
    with pytest.raises(DataError, match=r"shard-000002.tar sample 0 does not match its checksum in the shard index"):
        ds[ds.starts[2]]
    assert ds[ds.starts[2] + 1]["image"].shape == (1, 16, 16)  # the shard's other samples read on
    proc = anymodal("train", "tiny-test", *_from(str(folder)), "data.num_workers=1", "--run-dir", tmp_path / "run",
                    check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("anymodal train: error: ") and "shard-000002.tar" in last, proc.stderr
    assert ShardDataset(str(folder), verify=False)[ds.starts[3]]
    index = folder / "shard-000003.tar.idx.npy"  # an index changed in place: refused before any sample is read
    raw = bytearray(index.read_bytes())
    raw[-3] ^= 1
    index.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"shard index .*shard-000003.tar.idx.npy does not match the manifest"):
        ds[ds.starts[3]]


def test_a_sample_missing_a_field_is_an_error_naming_shard_and_key(digit_shards: Path, tmp_path: Path) -> None:
    from anymodal.core.shard_format import sample_index

    folder = _copy(digit_shards, tmp_path / "shards")
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name != "0000000001.label.json":
                tar.addfile(member, io.BytesIO(data))
    index = folder / "shard-000000.tar.idx.npy"
    with open(index, "wb") as f:
        import numpy as np

        np.save(f, sample_index(shard.read_bytes()))
    manifest = _manifest(folder)
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest(),
                                 index_bytes=index.stat().st_size, index_sha256=hashlib.sha256(index.read_bytes()).hexdigest())
    (folder / MANIFEST).write_text(json.dumps(manifest))
    ds = ShardDataset(str(folder))
    assert ds[0]["label"] is not None
    with pytest.raises(DataError, match=r"shard-000000.tar sample 1 \(key 0000000001\) lacks field\(s\) 'label'"):
        ds[1]


def test_missing_and_cut_shards_are_counted_skips_or_strict_errors(digit_shards: Path, tmp_path: Path) -> None:
    folder = _copy(digit_shards, tmp_path / "shards")
    (folder / "shard-000001.tar").unlink()
    with open(folder / "shard-000003.tar", "r+b") as f:
        f.truncate(1000)
    (folder / "shard-000005.tar.idx.npy").unlink()
    ds = ShardDataset(str(folder))
    assert [(Path(p).name, why.split(",")[0]) for p, why in ds.skipped] == [
        ("shard-000001.tar", "missing"), ("shard-000003.tar", "1000 bytes"),
        ("shard-000005.tar", "without its index shard-000005.tar.idx.npy")]
    manifest = _manifest(folder)
    assert len(ds) == manifest["samples"] - sum(manifest["shards"][k]["samples"] for k in (1, 3, 5))
    with pytest.raises(DataError, match="shard-000001.tar is missing"):
        ShardDataset(str(folder), strict=True)


def test_a_shard_removed_under_a_running_job_is_an_error(digit_shards: Path, tmp_path: Path) -> None:
    folder = _copy(digit_shards, tmp_path / "shards")
    ds = ShardDataset(str(folder))
    ds[0]
    (folder / "shard-000004.tar").unlink()
    with pytest.raises(DataError, match="shard-000004.tar is gone"):
        ds[ds.starts[4]]
    with open(folder / "shard-000000.tar", "r+b") as f:  # cut while open: a short read, not a crash
        f.truncate(10_000)
    with pytest.raises(DataError, match="shard-000000.tar sample [0-9]+ is cut short"):
        ds[ds.starts[1] - 1]


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.update(format="something-else/9"), "is not an anymodal shard manifest"),
    (lambda m: m["shards"][0].update(name="../../etc/passwd"), "shard entry 0 must be"),
    (lambda m: m["shards"][1].update(samples=-4), "shard entry 1 must be"),
    (lambda m: m.update(fields={}), "`fields` a non-empty mapping"),
])
def test_crafted_manifests_are_refused(change, expected: str, digit_shards: Path, tmp_path: Path) -> None:
    folder = _copy(digit_shards, tmp_path / "shards")
    manifest = _manifest(folder)
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=expected):
        ShardDataset(str(folder))


def test_not_a_shard_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json at .*not a shard folder"):
        ShardDataset(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        ShardDataset(str(tmp_path))


# --------------------------------------------------------------------------------------------
# object storage: a real S3 server on localhost


def test_shards_on_s3_write_train_and_resume(s3_endpoint: str, digit_shards: Path, tmp_path: Path) -> None:
    """`shards write --out s3://...` uploads (manifest last); training from the URL gives the local
    shards' losses; the cache holds checked copies; a tampered object is refused when fetched."""
    bucket = make_bucket("anymodal-shards")
    env = {"ANYMODAL_CACHE": str(tmp_path / "cache")}
    anymodal("shards", "write", "tiny-test", "--out", f"{bucket}/digits", "--shard-size", "256KB", "--quiet",
             env_extra=env, timeout=300)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    remote = json.loads(fs.cat(f"{bucket}/digits/train/{MANIFEST}"))
    assert remote["shards"] == _manifest(digit_shards / "train")["shards"]  # the same bytes as written locally
    anymodal("train", "tiny-test", *_from(str(digit_shards)), "--run-dir", tmp_path / "local", timeout=300)
    anymodal("train", "tiny-test", *_from(f"{bucket}/digits"), "data.num_workers=2", "--run-dir", tmp_path / "s3",
             env_extra=env, timeout=300)
    assert losses(tmp_path / "s3") == losses(tmp_path / "local")
    cached = list((tmp_path / "cache" / "shards").rglob("shard-*.tar"))
    assert cached and not list((tmp_path / "cache" / "shards").rglob("*.tmp"))
    # a remote object replaced by other bytes of the same size: the fetch checks it
    name = _manifest(digit_shards / "train")["shards"][1]["name"]
    data = bytearray(fs.cat(f"{bucket}/digits/train/{name}"))
    data[3000] ^= 1
    fs.pipe(f"{bucket}/digits/train/{name}", bytes(data))
    ds = ShardDataset(f"{bucket}/digits", split="train", cache=str(tmp_path / "fresh"))
    with pytest.raises(DataError, match=f"{name} does not match the manifest's SHA-256"):
        ds[ds.starts[1]]


def test_unreachable_and_missing_urls_are_one_error_line(s3_endpoint: str, tmp_path: Path) -> None:
    make_bucket("anymodal-empty")
    for url, expected in (("s3://anymodal-empty/nothing", "no manifest.json at s3://anymodal-empty/nothing"),
                          ("s3://anymodal-no-such-bucket/x", "s3://anymodal-no-such-bucket/x")):
        proc = anymodal("train", "tiny-test", *_from(url), "--run-dir", tmp_path / "run", check=False, timeout=120)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("anymodal train: error: ") and expected in last, proc.stderr
    closed = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}  # nothing listens on port 9
    proc = anymodal("train", "tiny-test", *_from("s3://anymodal-empty/x"), "--run-dir", tmp_path / "run2", check=False,
                    env_extra=closed, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("anymodal train: error: ") and "s3://anymodal-empty/x" in last, proc.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
