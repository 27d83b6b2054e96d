"""Every registered dataset trains from a YAML config through `anymodal train`, as the trainer
builds it (``split`` and ``strict`` passed in), on small real input: files written here with the
project's own code, or the data shipped with it. A dataset added to the registry without an input
here fails until one is added; one whose data is missing here is skipped with the reason. Each
file-reading dataset's input holds corrupt files of the kinds its reader must catch: a default run
skips and counts them (log and metrics.jsonl), a ``data.strict=true`` run stops with one error
line naming one. The readers' single checks follow at the end.

All runs share one subprocess that calls the CLI's ``main`` once per config (the command
``python -m anymodal`` runs), so the interpreter and torch start once for all of them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import pytest
import yaml
from PIL import Image
from torch._utils import ExceptionWrapper

from anymodal.core.config import plugin_config_dirs
from anymodal.core.errors import DataError
from anymodal.plugins.audio.data import SMALL_SPOKEN_DIGITS, AudioManifestDataset
from anymodal.core.errors import CorruptFileError
from anymodal.plugins.lidar.data import PointFolderDataset, aerial_tile_path, read_las
from anymodal.plugins.lidar.scenes import ShapesDataset
from anymodal.plugins.video.moving_digits import MovingDigitsDataset
from anymodal.plugins.audio.real_speech import read_stm, speech_sample_dir
from anymodal.plugins.video.data import FrameFolderDataset, NpyVideoDataset
from anymodal.plugins.manager import load_components
from helpers import anymodal

DATASETS = sorted(load_components().dataset.names())
STEPS = 2

#: A dataset's input: (modality file, tokenizer overrides, data.train node, corrupt files among
#: its input that a default run must skip and a strict run must name), or why it cannot run here.
Input = Union[tuple[str, dict, dict, list[Path]], str]


def _cut(path: Path, fraction: float, to: Path | None = None) -> Path:
    """``path``'s first ``fraction`` of bytes, written to ``to`` (default: in place)."""
    data = path.read_bytes()
    (to or path).write_bytes(data[:int(len(data) * fraction)])
    return to or path


def _clips(cache: Path) -> MovingDigitsDataset:
    return MovingDigitsDataset("train", size=4, frames=8, cache_dir=str(cache / "moving_digits"))


def _frames(ds: MovingDigitsDataset, index: int, channels: int = 1) -> np.ndarray:
    """Clip ``index`` as uint8 frames ``[T, H, W, channels]``."""
    frames = (ds[index]["video"].permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)
    return np.repeat(frames, channels, -1)


def _image_folder(tmp: Path) -> Input:
    ds = _clips(tmp)
    for i in range(len(ds)):
        for split in ("train", "test"):
            (tmp / "images" / split / f"digit_{ds.labels[i]}").mkdir(parents=True, exist_ok=True)
            for t in (0, 4):
                Image.fromarray(_frames(ds, i)[t, ..., 0]).save(tmp / "images" / split / f"digit_{ds.labels[i]}" / f"{i}_{t}.png")
    cut = tmp / "images" / "train" / f"digit_{ds.labels[0]}" / "cut.jpg"  # passes PIL's verify(), fails to decode
    Image.fromarray(_frames(ds, 0)[0, ..., 0]).save(cut, "JPEG")
    return "digits", {}, {"name": "image_folder", "root": str(tmp / "images"), "channels": 1, "image_size": 16}, \
        [_cut(cut, 0.6)]


def _frame_folder(tmp: Path) -> Input:
    ds = _clips(tmp)
    for i in range(len(ds)):
        folder = tmp / "frames" / f"digit_{ds.labels[i]}" / f"clip{i}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(_frames(ds, i)[..., 0]):
            Image.fromarray(frame).save(folder / f"{t}.png")
    broken = tmp / "frames" / f"digit_{ds.labels[0]}" / "broken"  # a frame past the first is cut short
    shutil.copytree(tmp / "frames" / f"digit_{ds.labels[0]}" / "clip0", broken)
    _cut(broken / "5.png", 0.5)
    return "video", {"channels": 3}, {"name": "frame_folder", "root": str(tmp / "frames"), "frames": 8,
                                      "image_size": 32}, [broken]


def _video_folder(tmp: Path) -> Input:
    if importlib.util.find_spec("av") is None:
        return "PyAV is not installed (pip install av)"
    from test_video import _write_mp4

    ds = _clips(tmp)
    for i in range(len(ds)):
        (tmp / "videos" / f"digit_{ds.labels[i]}").mkdir(parents=True, exist_ok=True)
        _write_mp4(tmp / "videos" / f"digit_{ds.labels[i]}" / f"clip{i}.mp4", _frames(ds, i, 3))
    cut = _cut(tmp / "videos" / f"digit_{ds.labels[0]}" / "clip0.mp4", 0.8,
               tmp / "videos" / f"digit_{ds.labels[0]}" / "cut.mp4")  # its header reads fine
    return "video", {"channels": 3}, {"name": "video_folder", "root": str(tmp / "videos"), "frames": 8,
                                      "image_size": 32}, [cut]


def _npy_video(tmp: Path) -> Input:
    ds = _clips(tmp)
    (tmp / "npy").mkdir()
    for i in range(len(ds)):
        np.save(tmp / "npy" / f"clip{i}.npy", _frames(ds, i))
    np.save(tmp / "npy" / "nan.npy", np.where(_frames(ds, 0) > 100, np.nan, 0.5).astype(np.float32))
    return "video", {}, {"name": "npy_video", "path_or_dir": str(tmp / "npy"), "frames": 8}, \
        [_cut(tmp / "npy" / "clip0.npy", 0.5, tmp / "npy" / "cut.npy"), tmp / "npy" / "nan.npy"]


def _write_laz(path: Path, points: np.ndarray) -> Path:
    import laspy

    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, [0.0] * 3
    las = laspy.LasData(header)
    las.x, las.y, las.z = points[:, 0], points[:, 1], points[:, 2]
    las.write(str(path))
    return path


def _misread(path: Path) -> Path:
    """Whole float32 records, finite but of any magnitude: what damaged bytes or another layout read as."""
    rng = np.random.default_rng(0)
    (rng.uniform(-1, 1, (256, 4)) * 10.0 ** rng.integers(0, 38, (256, 4))).astype("<f4").tofile(path)
    return path


def _write_bin(path: Path, points: np.ndarray) -> Path:
    """KITTI-style records: x, y, z and a zero intensity."""
    np.column_stack([points[:, :3], np.zeros(len(points))]).astype("<f4").tofile(path)
    return path


def _point_folder(tmp: Path) -> Input:
    ds = ShapesDataset("train", size=4, points=256, cache_dir=str(tmp / "lidar"))
    for i in range(len(ds)):
        (tmp / "points" / ds.classes[ds.labels[i]]).mkdir(parents=True, exist_ok=True)
        _write_bin(tmp / "points" / ds.classes[ds.labels[i]] / f"{i}.bin", ds[i]["points"].numpy())
    folder = tmp / "points" / ds.classes[ds.labels[0]]
    corrupt = [_misread(folder / "misread.bin")]
    if importlib.util.find_spec("lazrs") is not None:
        corrupt.append(_cut(_write_laz(folder / "cut.laz", ds[0]["points"].numpy().astype(np.float64)), 0.5))
    return "lidar", {}, {"name": "point_folder", "root": str(tmp / "points"),
                                                      "channels": 3}, corrupt


def _audio_manifest(tmp: Path) -> Input:
    lines = (Path(SMALL_SPOKEN_DIGITS) / "train.jsonl").read_text().splitlines()[::75]
    cut = _cut(Path(SMALL_SPOKEN_DIGITS) / json.loads(lines[0])["path"], 0.5, tmp / "cut.flac")
    lines.append(json.dumps({**json.loads(lines[0]), "path": str(cut)}))
    (tmp / "audio.jsonl").write_text("\n".join(lines) + "\n")
    return "audio", {}, {"name": "audio_manifest", "manifest": str(tmp / "audio.jsonl"), "root": SMALL_SPOKEN_DIGITS}, \
        [cut]


def _scene_log(tmp: Path, kind: str) -> Input:
    """Generated streets written as MCAP recordings (one of them cut by a crash) or as a nuScenes
    folder (one sweep damaged), read with the scene modality."""
    from anymodal.plugins.scenes.export import export_mcap, export_nuscenes

    if kind == "mcap":
        export_mcap(tmp, "train", streets=2, frames_per_street=2)
        cut = _cut(tmp / "train" / "street-0001.mcap", 0.75)
        return "street_scenes", {}, {"name": "mcap_scenes", "path": str(tmp / "train")}, [cut]
    root = export_nuscenes(tmp / "mini", frames_per_street=1)
    sweep = sorted((root / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))[0]
    return "street_scenes", {}, {"name": "nuscenes", "root": str(root)}, [_cut(sweep, 0.5)]


def _shards(tmp: Path) -> Input:
    """The digits written as shards by `anymodal shards write`'s code, one shard cut short."""
    from anymodal.app.shards import write_shards
    from anymodal.app.train import load_config

    composed, _ = load_config("tiny-test", ["data.train={_replace_: true, name: digits, size: 24}"])
    write_shards(composed.cfg, str(tmp / "shards"), ["train"], shard_size=4096, workers=1, progress=False)
    return "digits", {}, {"name": "shards", "path": str(tmp / "shards")}, [_cut(tmp / "shards" / "train" / "shard-000001.tar", 0.5)]


def _shipped(name: str, modality: str, node: dict, needs: str = "", fetch: str = "") -> Callable[[Path], Input]:
    def make(tmp: Path) -> Input:
        if needs and not os.path.exists(needs):
            return f"{needs} is missing; {fetch}"
        return modality, {}, {"name": name, **node}, []
    return make


def _generated(name: str, modality: str, tokenizer: dict, node: dict) -> Callable[[Path], Input]:
    return lambda tmp: (modality, tokenizer, {"name": name, "cache_dir": str(tmp / "cache"), **node}, [])


FETCH = "bash scripts/install.sh fetches it"
INPUTS: dict[str, Callable[[Path], Input]] = {
    "mnist": _shipped("mnist", "image", {"limit": 4}),
    "digits": _shipped("digits", "digits", {"size": 16}),
    "image_folder": _image_folder,
    "moving_digits": _generated("moving_digits", "video", {}, {"size": 4, "frames": 8}),
    "video_folder": _video_folder,
    "frame_folder": _frame_folder,
    "npy_video": _npy_video,
    "point_folder": _point_folder,
    "aerial_tile": _shipped("aerial_tile", "lidar", {"grid": 3, "path": aerial_tile_path()}, aerial_tile_path(), FETCH),
    "shapes": _generated("shapes", "lidar", {}, {"size": 4, "points": 256}),
    "lidar_sweeps": _generated("lidar_sweeps", "lidar_sweep", {"pillar_size": 6.4, "max_points": 8, "hidden": 16},
                               {"size": 2, "beams": 8, "azimuth_steps": 128}),
    "street_scenes": _shipped("street_scenes", "street_scenes", {"size": 2, "beams": 8, "azimuth_steps": 64,
                                                                  "image_size": [32, 64]}),
    "mcap_scenes": lambda tmp: _scene_log(tmp, "mcap"),
    "nuscenes": lambda tmp: _scene_log(tmp, "nuscenes"),
    "audio_manifest": _audio_manifest,
    "shards": _shards,
    "spoken_digits": _shipped("spoken_digits", "audio", {"root": SMALL_SPOKEN_DIGITS}),
    "speech_sample": _shipped("speech_sample", "audio", {"max_seconds": 1.5, "root": speech_sample_dir()},
                              os.path.join(speech_sample_dir(), "sample.wav"), FETCH),
}


#: Narrower tokenizers than the modality files': a step in a fraction of a second.
SMALL_TOKENIZERS = {"lidar": {"groups": 8, "group_size": 16, "widths": [16, 16, 32]}}


def _modality_file(name: str) -> Path:
    """A built-in modality's config, in the configs/ folder of its plugin."""
    return next(p for base in plugin_config_dirs() for p in [base / "modality" / f"{name}.yaml"] if p.is_file())


def _config(modality_file: str, tokenizer: dict, train: dict) -> dict[str, Any]:
    """A whole config with the modality's tokenizer and masker and only this dataset: no default
    dataset keys of the modality file reach it."""
    modality = yaml.safe_load(_modality_file(modality_file).read_text())
    small = {**SMALL_TOKENIZERS.get(modality_file, {}), **tokenizer}
    if small:  # a scene modality's tokenizer is its first sensor's (an interpolation): nothing to shrink
        modality["modality"]["tokenizer"].update(small)
    return {
        "defaults": {"model": "cpu", "recipe": "mae"},
        "run": {"log_every": 1, "checkpoint_every": 100, "progress": False, "tensorboard": False},
        "model": {**modality.get("model", {}), "dim": 32, "depth": 1, "num_heads": 2},
        "modality": modality["modality"],
        "data": {"batch_size": 2, "train": train, "test": train, "transforms": []},
        "recipe": {"stages": {"*": {"steps": STEPS, "optim": {"warmup_steps": 1},
                                    "objectives": {"masked_pixel": {"decoder_dim": 16, "decoder_heads": 2}}}}},
    }


RUNNER = """
import contextlib, io, json, logging, sys, time, traceback
from anymodal.app.cli import main
results = {}
for key, args in json.loads(sys.argv[1]):
    err, handlers, start = io.StringIO(), list(logging.getLogger().handlers), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except BaseException:  # reported by the test, with its traceback
            rc = -1
            err.write(traceback.format_exc())
    for handler in set(logging.getLogger().handlers) - set(handlers):  # each run's log holds only that run
        logging.getLogger().removeHandler(handler)
        handler.close()
    results[key] = {"rc": rc, "stderr": err.getvalue()[-3000:], "seconds": time.perf_counter() - start}
print(json.dumps(results))
"""


def _train_all(jobs: dict[str, list[str]], cache: Path) -> dict[str, dict[str, Any]]:
    """``anymodal train ARGS`` for every job, one after another in one process: {key: rc, stderr}."""
    env = dict(os.environ, ANYMODAL_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(list(jobs.items()))], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _selected(request: pytest.FixtureRequest) -> list[str]:
    """The datasets whose test this session runs (so `-k npy_video` trains on npy_video alone)."""
    return [item.callspec.params["dataset"] for item in request.session.items
            if item.originalname == "test_dataset_trains_from_yaml" and item.module is request.module]


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every selected dataset's input (or skip reason), and the results of `anymodal train` on it:
    in the default mode, and where its input holds corrupt files, with ``data.strict=true``."""
    root = tmp_path_factory.mktemp("datasets")
    out: dict[str, Any] = {}
    jobs: dict[str, list[str]] = {}
    for name in _selected(request):
        if name not in INPUTS:
            continue
        (root / name).mkdir()
        made = INPUTS[name](root / name)
        if isinstance(made, str):
            out[name] = {"skip": made}
            continue
        *config, corrupt = made
        (root / name / "config.yaml").write_text(yaml.safe_dump(_config(*config)))
        out[name] = {"run": root / name / "run", "corrupt": [str(p) for p in corrupt]}
        jobs[name] = ["train", str(root / name / "config.yaml"), "--run-dir", str(root / name / "run")]
        if corrupt:
            jobs[f"{name} strict"] = [*jobs[name][:-1], str(root / name / "strict"), "data.strict=true"]
    results = _train_all(jobs, root / "cache") if jobs else {}
    for name in out:
        if "run" in out[name]:
            out[name].update(default=results[name], strict=results.get(f"{name} strict"))
    return out


def _one_error_line(stderr: str, command: str = "train") -> str:
    """The error line a user error ends with; fails on a traceback or any other last line."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"anymodal {command}: error: "), stderr
    return last


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_trains_from_yaml(dataset: str, runs: dict[str, Any]) -> None:
    """Trains from a config in the default mode, its corrupt files skipped and logged; with
    ``data.strict=true`` the first corrupt file is one error line naming it."""
    assert dataset in INPUTS, (f"registered dataset {dataset!r} has no small input in {__file__}: add one to INPUTS "
                               "so it is trained from a config like every other")
    result = runs[dataset]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["default"]["rc"] == 0, result["default"]["stderr"]
    records = [json.loads(line) for line in (result["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert yaml.safe_load((result["run"] / "config.yaml").read_text())["data"]["train"]["name"] == dataset
    log = (result["run"] / "logs" / "anymodal.log").read_text()
    skips = [line for line in log.splitlines() if "WARNING" in line and "skipped" in line]
    for path in result["corrupt"]:
        assert any(path in line for line in skips), f"{path} is not among the skips logged:\n{log}"
    assert all(r.get("data/skipped", 0) == len(result["corrupt"]) for r in records), records
    if result["corrupt"]:
        assert result["strict"]["rc"] == 2, result["strict"]["stderr"]
        error = _one_error_line(result["strict"]["stderr"])
        assert any(path in error for path in result["corrupt"]), error


def test_corrupt_file_read_in_a_loader_worker_is_one_error_line(tmp_path: Path) -> None:
    """torch re-raises a worker's error in the main process as ``type(error)(message)``, the
    worker's traceback in the message: the CLI still prints one line naming the file."""
    ds = ShapesDataset("train", size=1, points=256, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "points").mkdir()
    _write_bin(tmp_path / "points" / "good.bin", ds[0]["points"].numpy())
    _misread(tmp_path / "points" / "noise.bin")
    node = {"name": "point_folder", "root": str(tmp_path / "points"), "channels": 3, "verify": False}  # read in the worker
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config("lidar", {}, node)))
    proc = anymodal("train", tmp_path / "config.yaml", "--run-dir", tmp_path / "run", "data.strict=true",
                    "data.num_workers=1", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    error = _one_error_line(proc.stderr)
    assert str(tmp_path / "points" / "noise.bin") in error and "beyond" in error, error


# --------------------------------------------------------------------------------------------
# the readers' checks, one by one


def test_corrupt_file_error_survives_pickling_and_the_loader_rebuild() -> None:
    error = CorruptFileError("/data/it's here: a.jpg", "OSError: image file is truncated")
    back = pickle.loads(pickle.dumps(error))
    assert (back.path, back.reason, str(back)) == (error.path, error.reason, str(error))
    try:
        raise error
    except CorruptFileError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    with pytest.raises(CorruptFileError) as info:
        wrapped.reraise()
    assert (info.value.path, info.value.reason, str(info.value)) == (error.path, error.reason, str(error))


@pytest.mark.skipif(importlib.util.find_spec("lazrs") is None, reason='needs laspy and lazrs (pip install "laspy[lazrs]")')
@pytest.mark.parametrize("ending, match", [(".las", "truncated: the header declares 256 points, only 200"),
                                           (".laz", "LazrsError")])
def test_a_cut_las_or_laz_file_is_corrupt(tmp_path: Path, ending: str, match: str) -> None:
    import laspy

    path = _write_laz(tmp_path / f"a{ending}", np.random.default_rng(0).uniform(-10, 10, (256, 3)))
    with laspy.open(str(path)) as fh:  # a LAS cut on a record boundary: only the header's count tells
        keep = fh.header.offset_to_point_data + 200 * fh.header.point_format.size
    path.write_bytes(path.read_bytes()[:keep] if ending == ".las" else path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(CorruptFileError, match=match) as info:
        read_las(str(path))
    assert info.value.path == str(path)


def test_point_clouds_out_of_range_or_too_small_are_skipped(tmp_path: Path) -> None:
    _write_bin(tmp_path / "sweep.bin", np.random.default_rng(1).uniform(-50, 50, (300, 3)))
    _write_bin(tmp_path / "short.bin", np.random.default_rng(2).uniform(-50, 50, (20, 3)))
    _misread(tmp_path / "misread.bin")
    ds = PointFolderDataset(str(tmp_path), channels=3, min_points=100)
    assert [p for p, _ in ds.samples] == [str(tmp_path / "sweep.bin")]
    reasons = dict(ds.skipped)
    assert "beyond 1e+07 m" in reasons[str(tmp_path / "misread.bin")]
    assert "20 points, fewer than min_points=100" in reasons[str(tmp_path / "short.bin")]
    nuscenes = tmp_path / "five" / "sweep.bin"  # x, y, z, intensity, ring
    nuscenes.parent.mkdir()
    np.column_stack([np.full((16, 3), 1e8), np.zeros((16, 2))]).astype("<f4").tofile(nuscenes)
    with pytest.raises(CorruptFileError, match="beyond"):  # 16 records of 5 read as 20 of 4 would pass the size check
        PointFolderDataset(str(nuscenes.parent), strict=True)
    cloud = np.column_stack([np.arange(48.0).reshape(16, 3), np.ones(16), np.arange(16)]).astype("<f4")
    cloud.tofile(nuscenes)
    read = PointFolderDataset(str(nuscenes.parent), bin_channels=5)[0]["points"]
    np.testing.assert_array_equal(read.numpy(), cloud[:, :4])


def test_npy_videos_split_folder_and_values_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    np.save(tmp_path / "train" / "a.npy", np.full((4, 8, 8, 1), 0.5, np.float32))
    np.save(tmp_path / "train" / "b.npy", np.full((4, 8, 8, 1), 255.0, np.float32))  # 0-255 stored as float
    ds = NpyVideoDataset(str(tmp_path), split="train", labels=[3, 4], frames=4)
    assert ds.paths == [str(tmp_path / "train" / "a.npy")] and ds.labels.tolist() == [3]
    assert "span [255, 255]" in dict(ds.skipped)[str(tmp_path / "train" / "b.npy")]
    assert len(NpyVideoDataset(str(tmp_path / "train"), labels=[3, 4], frames=4, verify=False)) == 2


def test_frame_folder_frames_of_different_sizes_are_found_by_the_scan(tmp_path: Path) -> None:
    folder = tmp_path / "walk" / "v1"
    folder.mkdir(parents=True)
    for i, side in enumerate((8, 8, 6)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(CorruptFileError, match="v1.*frames have different sizes: 0.png is 8x8, 2.png is 6x6"):
        FrameFolderDataset(str(tmp_path), frames=2, strict=True)


def test_audio_manifest_folder_by_split_and_unreadable_manifests(tmp_path: Path) -> None:
    record = json.loads((Path(SMALL_SPOKEN_DIGITS) / "test.jsonl").read_text().splitlines()[0])
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    ds = AudioManifestDataset(str(tmp_path), split="test", root=SMALL_SPOKEN_DIGITS)
    assert ds.manifest == str(tmp_path / "test.jsonl") and len(ds) == 1
    with pytest.raises(FileNotFoundError, match="split 'train'.*train.csv, train.jsonl"):
        AudioManifestDataset(str(tmp_path), split="train")
    (tmp_path / "binary.csv").write_bytes(b"path\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="binary.csv.*not UTF-8"):
        AudioManifestDataset(str(tmp_path / "binary.csv"))
    (tmp_path / "sample.stm").write_bytes(b"\xff\xfe binary")
    with pytest.raises(DataError, match="sample.stm.*not a UTF-8 STM"):
        read_stm(str(tmp_path / "sample.stm"))
