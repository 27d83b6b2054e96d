"""`NuScenesDataset`: scene samples from a folder in the nuScenes layout, read from its JSON tables
and binary files directly (no devkit): ``<root>/<version>/{scene,sample,sample_data,
calibrated_sensor,ego_pose,sensor,log}.json`` (and ``lidarseg.json``, ``category.json`` where
present), ``LIDAR_TOP`` sweeps as ``.pcd.bin`` (five float32 per point: x, y, z, intensity, ring),
camera JPEGs.

One sample per nuScenes sample (a key frame): the lidar sweep, plus ``sweeps - 1`` earlier sweeps
moved into its frame through the ego poses; each chosen camera's key frame image, its extrinsics
taken at its own time and expressed in the ego frame at the lidar's time. ``text`` is the scene's
description, ``label`` the index of the log's location (sorted), ``<lidar>/labels`` the lidarseg
class index of each point (-1 for points of earlier sweeps, which lidarseg does not label).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import float_arg, int_arg
from ...core.data import report_skipped
from ...core.errors import CorruptFileError, DataError
from .ros import intrinsics_from_ros, resize_camera
from .rotations import rigid_from_quaternion

__all__ = ["NuScenesDataset", "MINI_TRAIN", "MINI_VAL"]

log = logging.getLogger(__name__)
TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor", "log")
# nuScenes v1.0-mini's scenes by split (the devkit's splits.mini_train and mini_val)
MINI_TRAIN = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077", "scene-1094",
              "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")


class NuScenesDataset(Dataset):
    """Key frames of a nuScenes-layout folder as scene samples.

    Args:
        root: the folder holding ``<version>/``, ``samples/``, ``sweeps/`` (and ``lidarseg/``).
        split: ``train`` or ``test``: for ``v1.0-mini``, its mini_train and mini_val scenes;
            other versions name their scenes with ``scenes``.
        version: the tables' folder (``v1.0-mini``, ``v1.0-trainval``).
        scenes: scene names to read (overrides ``split``'s).
        lidar: the lidar channel; cameras: the camera channels. A channel's sample key is its
            name in lower case (``LIDAR_TOP`` -> ``lidar_top``).
        sweeps: lidar sweeps per sample (1: the key frame's alone).
        intensity_scale: the factor on the intensity column (nuScenes stores 0-255; 1/255 gives
            the [0, 1] of the generated scenes).
        image_size: ``[H, W]`` to resize the images to on read (intrinsics scaled with them).
        strict: refuse a sample whose files are missing or damaged; by default it is left out, and
            listed in ``skipped`` and logged.
    """

    def __init__(self, root: str, split: str = "train", version: str = "v1.0-mini", scenes: Optional[Sequence[str]] = None,
                 lidar: str = "LIDAR_TOP", cameras: Sequence[str] = ("CAM_FRONT",), sweeps: int = 1,
                 intensity_scale: float = 1 / 255, image_size: Optional[Sequence[int]] = None, strict: bool = False) -> None:
        self.root = Path(str(root)).expanduser()
        self.sweeps = int_arg("sweeps", sweeps, 1)
        self.intensity_scale = float_arg("intensity_scale", intensity_scale)
        self.image_size = list(image_size) if image_size else None
        if not isinstance(strict, bool):
            raise DataError(f"nuscenes strict must be true or false, got {strict!r}")
        tables_dir = self.root / version
        if not tables_dir.is_dir():
            found = sorted(p.parent.name for p in self.root.glob("*/sample.json"))
            raise DataError(f"no nuScenes tables at {str(tables_dir)!r} (root {str(self.root)!r}, version {version!r}); "
                            f"versions there: {', '.join(found) or 'none'}")
        self.tables = {name: self._table(tables_dir, name) for name in TABLES}
        for optional in ("lidarseg", "category"):
            if (tables_dir / f"{optional}.json").is_file():
                self.tables[optional] = self._table(tables_dir, optional)
        by_token = {name: {row["token"]: row for row in rows} for name, rows in self.tables.items() if name != "category"}
        self.by_token = by_token
        self.lidarseg = {row["sample_data_token"]: row["filename"] for row in self.tables.get("lidarseg", [])}
        self.classes = [c["name"] for c in sorted(self.tables.get("category", []), key=lambda c: c.get("index", 0))]
        self.channel_of = {t: row["channel"] for t, row in by_token["sensor"].items()}
        known = sorted(set(self.channel_of.values()))
        for channel in (lidar, *cameras):
            if channel not in known:
                raise DataError(f"nuscenes channel {channel!r} is not in {tables_dir}/sensor.json; channels: {', '.join(known)}")
        self.lidar, self.cameras = lidar, list(cameras)
        self.locations = sorted({row["location"] for row in self.tables["log"]})
        wanted = list(scenes) if scenes else self._split_scenes(split, version)
        names = {row["name"]: row for row in self.tables["scene"]}
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise DataError(f"nuscenes scenes {unknown[:5]} are not in {tables_dir}/scene.json ({len(names)} scenes there)")
        # key frame sample_data per (sample, channel)
        self.key_data: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.tables["sample_data"]:
            if row.get("is_key_frame"):
                channel = self.channel_of.get(self._get("calibrated_sensor", row["calibrated_sensor_token"],
                                                        f"sample_data {row['token']}")["sensor_token"])
                self.key_data[(row["sample_token"], channel)] = row
        self.samples: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (sample, scene)
        self.skipped: list[tuple[str, str]] = []
        for name in wanted:
            scene = names[name]
            token = scene["first_sample_token"]
            while token:
                sample = self._get("sample", token, f"scene {name}")
                problem = self._check_files(sample)
                if problem is None:
                    self.samples.append((sample, scene))
                elif strict:
                    raise problem
                else:
                    self.skipped.append((problem.path if isinstance(problem, CorruptFileError) else f"sample {token}",
                                         str(problem)))
                token = sample.get("next", "")
        report_skipped(self.skipped, str(self.root), "nuScenes sample")
        if not self.samples:
            raise DataError(f"nuscenes found no readable sample in scenes {wanted[:5]} of {tables_dir}")

    @staticmethod
    def _table(folder: Path, name: str) -> list[dict[str, Any]]:
        path = folder / f"{name}.json"
        try:
            rows = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"nuScenes table {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(str(path), f"not a JSON table: {e}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "token" in r for r in rows):
            raise CorruptFileError(str(path), "a nuScenes table is a JSON list of records, each with a token")
        return rows

    def _get(self, table: str, token: str, referrer: str) -> dict[str, Any]:
        row = self.by_token[table].get(token)
        if row is None:
            raise DataError(f"nuScenes {referrer} references {table} token {token!r}, which "
                            f"{self.root}/{table}.json does not hold")
        return row

    @staticmethod
    def _split_scenes(split: str, version: str) -> list[str]:
        if version.endswith("mini") and split in ("train", "test"):
            return list(MINI_TRAIN if split == "train" else MINI_VAL)
        raise DataError(f"nuscenes {version} split {split!r}: name the scenes to read with scenes: [scene-0001, ...] "
                        "(the mini version's train and test are its mini_train and mini_val)")

    def _check_files(self, sample: dict[str, Any]) -> Optional[DataError]:
        """What keeps ``sample`` from being read, found by a stat of its files: a missing file, a
        sweep that is not 5 float32 per point, lidarseg labels of another length."""
        for channel in (self.lidar, *self.cameras):
            row = self.key_data.get((sample["token"], channel))
            if row is None:
                return DataError(f"nuScenes sample {sample['token']} has no {channel} key frame in sample_data")
            path = self.root / row["filename"]
            if not path.is_file():
                return DataError(f"nuScenes sample_data {row['token']} ({channel}) references {row['filename']}, "
                                 f"which is not under {self.root}")
            if channel == self.lidar:
                size = path.stat().st_size
                if size % 20:
                    return CorruptFileError(str(path), f"a .pcd.bin holds 5 float32 per point; {size} bytes is not a multiple of 20")
                seg = self.lidarseg.get(row["token"])
                if seg is not None and (not (self.root / seg).is_file() or (self.root / seg).stat().st_size != size // 20):
                    return CorruptFileError(str(self.root / seg), f"lidarseg labels of sample_data {row['token']}: "
                                            f"{size // 20} points need {size // 20} bytes")
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def _pose(self, table: str, token: str, referrer: str) -> np.ndarray:
        row = self._get(table, token, referrer)
        try:
            return rigid_from_quaternion(row["translation"], row["rotation"])
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"nuScenes {table} {token}: bad translation or rotation ({e})") from None

    def _sensor_to_world(self, row: dict[str, Any]) -> np.ndarray:
        where = f"sample_data {row['token']}"
        return self._pose("ego_pose", row["ego_pose_token"], where) @ self._pose("calibrated_sensor", row["calibrated_sensor_token"], where)

    def _points(self, row: dict[str, Any]) -> np.ndarray:
        path = self.root / row["filename"]
        raw = np.fromfile(path, dtype="<f4")
        if raw.size % 5:
            raise CorruptFileError(str(path), f"a .pcd.bin holds 5 float32 per point; {raw.size} values is not a multiple of 5")
        points = raw.reshape(-1, 5)[:, :4].astype(np.float32)
        points[:, 3] *= self.intensity_scale
        return points

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample, scene = self.samples[i]
        lidar_row = self.key_data[(sample["token"], self.lidar)]
        ego = self._pose("ego_pose", lidar_row["ego_pose_token"], f"sample_data {lidar_row['token']}")
        lidar_to_ego = self._pose("calibrated_sensor", lidar_row["calibrated_sensor_token"], f"sample_data {lidar_row['token']}")
        world_to_lidar = np.linalg.inv(ego @ lidar_to_ego)
        key = self.lidar.lower()
        clouds, labels, row = [], [], lidar_row
        for sweep in range(self.sweeps):
            points = self._points(row)
            if sweep:  # an earlier sweep, moved into the key frame's lidar frame
                m = world_to_lidar @ self._sensor_to_world(row)
                points[:, :3] = points[:, :3] @ m[:3, :3].T.astype(np.float32) + m[:3, 3].astype(np.float32)
            clouds.append(points)
            labels.append(self._labels(row, len(points)) if sweep == 0 else np.full(len(points), -1, np.int64))
            if not row.get("prev"):
                break
            row = self._get("sample_data", row["prev"], f"sample_data {row['token']}")
            if not (self.root / row["filename"]).is_file():
                break  # a sweep outside the folder (sweeps/ not unpacked): the key frame and those before it
        out: dict[str, Any] = {key: torch.from_numpy(np.concatenate(clouds)),
                               f"{key}/extrinsics": torch.from_numpy(lidar_to_ego.astype(np.float32)),
                               f"{key}/timestamp": self._seconds(lidar_row, scene),
                               "ego_pose": torch.from_numpy(ego.astype(np.float32)),
                               "frame": f"{scene['name']}/{sample['token']}", "text": scene.get("description", ""),
                               "label": self.locations.index(self._get("log", scene["log_token"], f"scene {scene['name']}")["location"])}
        if labels[0] is not None:
            out[f"{key}/labels"] = torch.from_numpy(np.concatenate(labels))
        for channel in self.cameras:
            out |= self._camera(channel, self.key_data[(sample["token"], channel)], ego, scene)
        return out

    def _seconds(self, row: dict[str, Any], scene: dict[str, Any]) -> float:
        """``row``'s time in seconds since its scene's first sample (microsecond tables; kept small
        for float32 batches)."""
        start = self._get("sample", scene["first_sample_token"], f"scene {scene['name']}")["timestamp"]
        return (int(row["timestamp"]) - int(start)) / 1e6

    def _labels(self, row: dict[str, Any], count: int) -> Optional[np.ndarray]:
        name = self.lidarseg.get(row["token"])
        if name is None:
            return None
        path = self.root / name
        try:
            labels = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise CorruptFileError(str(path), f"lidarseg labels of sample_data {row['token']}: {e.strerror or e}") from None
        if len(labels) != count:
            raise CorruptFileError(str(path), f"{len(labels)} lidarseg labels for a sweep of {count} points")
        return labels.astype(np.int64)

    def _camera(self, channel: str, row: dict[str, Any], ego: np.ndarray, scene: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        path = self.root / row["filename"]
        try:
            with Image.open(path) as picture:
                image = torch.from_numpy(np.asarray(picture.convert("RGB")).transpose(2, 0, 1).astype(np.float32) / 255.0)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise CorruptFileError(str(path), f"camera image of sample_data {row['token']}: {e}") from None
        calibration = self._get("calibrated_sensor", row["calibrated_sensor_token"], f"sample_data {row['token']}")
        try:
            k = intrinsics_from_ros(np.asarray(calibration["camera_intrinsic"], np.float64).reshape(-1))
        except (KeyError, ValueError) as e:
            raise DataError(f"nuScenes calibrated_sensor {calibration['token']} ({channel}) has no 3x3 camera_intrinsic ({e})") from None
        key = channel.lower()
        if self.image_size:
            image, k = resize_camera(image, k, self.image_size, str(path))
        extrinsics = np.linalg.inv(ego) @ self._sensor_to_world(row)  # camera at its time -> ego at the lidar's
        return {key: image, f"{key}/intrinsics": torch.from_numpy(k.astype(np.float32)),
                f"{key}/extrinsics": torch.from_numpy(extrinsics.astype(np.float32)),
                f"{key}/timestamp": self._seconds(row, scene)}

