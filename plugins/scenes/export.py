"""Generated street scenes written out as real AV logs, by the formats' own rules: ROS 2 MCAP
recordings (through ``mcap-ros2-support``'s writer) and a folder in the nuScenes layout. They are the
fixtures of the readers' tests (every pose and point is known, so a round trip is checked against
the simulator) and a way to try a pipeline built for those formats without the real data.

MCAP: one recording per street, ``<out>/<split>/street-NNNN.mcap``, with the topics of
`anymodal.plugins.scenes.mcap_data.DEFAULT_SENSORS` plus ``/tf_static`` (base_link -> each sensor),
``/tf`` (map -> base_link at each frame's start and end: the ego holds still while a frame is
captured), ``/caption`` (std_msgs/String) and ``/street_kind`` (std_msgs/Int32).

nuScenes: ``<out>/v1.0-mini/*.json``, ``samples/LIDAR_TOP/*.pcd.bin`` (x, y, z, intensity 0-255,
ring as float32), ``samples/CAM_FRONT/*.jpg`` and ``lidarseg/v1.0-mini/*_lidarseg.bin``; ten
streets named as the mini split's ten scenes (its eight train scenes from the train streets, its
two val scenes from the test streets). A scene's description is its first frame's caption, the
log's location the street's kind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .data import CLASSES, StreetScenesDataset
from .nuscenes import MINI_TRAIN, MINI_VAL
from .ros import MSGDEFS, cloud_message, compressed_image_message, image_message, intrinsics_to_ros, ros_time
from .rotations import quaternion_from_rotation
from .world import STREET_KINDS

__all__ = ["export_mcap", "export_nuscenes"]

START_NS = 1_700_000_000 * 1_000_000_000  # the recordings' clock: a plausible epoch time


def _frame_ns(index: int, offset: float = 0.0) -> int:
    return START_NS + int(round((index * 0.1 + offset) * 1e9))


def _rings(points: np.ndarray, beams: int) -> np.ndarray:
    """Each point's beam (0 = lowest), from its elevation: the lidar's ``ring`` field."""
    elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
    return np.clip(np.rint((elevation + 25.0) / 35.0 * (beams - 1)), 0, beams - 1).astype(np.uint16)


def _transform(parent: str, child: str, m: np.ndarray, stamp: int) -> dict[str, Any]:
    w, x, y, z = quaternion_from_rotation(m[:3, :3])
    t = m[:3, 3]
    return {"header": {"stamp": ros_time(stamp), "frame_id": parent}, "child_frame_id": child,
            "transform": {"translation": {"x": t[0], "y": t[1], "z": t[2]}, "rotation": {"x": x, "y": y, "z": z, "w": w}}}


def export_mcap(out: str | Path, split: str = "train", streets: int = 4, frames_per_street: int = 4, seed: int = 0,
                image: str = "jpeg", radar: bool = False, padding: int = 0, chunk_size: int = 256 * 1024) -> list[Path]:
    """Write ``streets`` recordings of ``split``'s generated streets under ``out/<split>/``.

    Args:
        image: ``jpeg`` or ``png`` (CompressedImage on ``/cam_front/image/compressed``) or ``raw``
            (an rgb8 Image on ``/cam_front/image``).
        radar: add ``/radar_front/points`` (x, y, z, doppler, rcs, label) and its transform.
        padding: unused bytes after each point of the clouds (real drivers pad to 16 or 32 bytes).
        chunk_size: bytes of messages per zstd chunk (a frame spans a few: a cut file loses the tail only).
    """
    from mcap_ros2.writer import Writer

    data = StreetScenesDataset(split, size=streets * frames_per_street, frames_per_street=frames_per_street,
                               radar=radar, seed=seed)
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for street in range(streets):
        path = folder / f"street-{street:04d}.mcap"
        with open(path, "wb") as f:
            writer = Writer(f, chunk_size=chunk_size)
            schemas = {name.split("/")[-1]: writer.register_msgdef(name, text) for name, text in MSGDEFS.items()}
            first = street * frames_per_street
            sample = data[first]
            mounts = [("lidar_top", sample["lidar_top/extrinsics"]), ("cam_front", sample["cam_front/extrinsics"])]
            if radar:
                mounts.append(("radar_front", sample["radar_front/extrinsics"]))
            static = {"transforms": [_transform("base_link", name, m.double().numpy(), _frame_ns(first)) for name, m in mounts]}
            writer.write_message("/tf_static", schemas["TFMessage"], static, log_time=_frame_ns(first))
            for index in range(first, first + frames_per_street):
                sample = data[index] if index != first else sample
                t = _frame_ns(index)
                ego = sample["ego_pose"].double().numpy()
                for end in (0.0, 0.02):
                    writer.write_message("/tf", schemas["TFMessage"], {"transforms": [_transform("map", "base_link", ego, _frame_ns(index, end))]},
                                         log_time=_frame_ns(index, end))
                points, labels = sample["lidar_top"].numpy(), sample["lidar_top/labels"].numpy()
                cloud = {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "intensity": points[:, 3],
                         "ring": _rings(points, data.beams), "label": labels.astype(np.uint8)}
                t_lidar = _frame_ns(index, 0.01)
                writer.write_message("/lidar_top/points", schemas["PointCloud2"], cloud_message(cloud, "lidar_top", t_lidar, padding),
                                     log_time=t_lidar)
                pixels = sample["cam_front"].numpy()
                if image == "raw":
                    writer.write_message("/cam_front/image", schemas["Image"], image_message(pixels, "cam_front", t), log_time=t)
                else:
                    writer.write_message("/cam_front/image/compressed", schemas["CompressedImage"],
                                         compressed_image_message(pixels, "cam_front", t, image), log_time=t)
                h, w = pixels.shape[1:]
                k = intrinsics_to_ros(sample["cam_front/intrinsics"].double().numpy())
                info = {"header": {"stamp": ros_time(t), "frame_id": "cam_front"}, "height": h, "width": w,
                        "distortion_model": "plumb_bob", "d": [0.0] * 5, "k": k, "r": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                        "p": k[0:3] + [0.0] + k[3:6] + [0.0] + k[6:9] + [0.0]}
                writer.write_message("/cam_front/camera_info", schemas["CameraInfo"], info, log_time=t)
                if radar:
                    r, t_radar = sample["radar_front"].numpy(), _frame_ns(index, 0.02)
                    returns = {"x": r[:, 0], "y": r[:, 1], "z": r[:, 2], "doppler": r[:, 3], "rcs": r[:, 4],
                               "label": sample["radar_front/labels"].numpy().astype(np.uint8)}
                    writer.write_message("/radar_front/points", schemas["PointCloud2"],
                                         cloud_message(returns, "radar_front", t_radar, padding), log_time=t_radar)
                writer.write_message("/caption", schemas["String"], {"data": sample["text"]}, log_time=t)
                writer.write_message("/street_kind", schemas["Int32"], {"data": int(sample["label"])}, log_time=t)
            writer.finish()
        written.append(path)
    return written


def _token(*parts: Any) -> str:
    """A nuScenes-style token (32 hex digits), fixed by what it names."""
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def _pose(m: np.ndarray) -> dict[str, list[float]]:
    return {"translation": [float(v) for v in m[:3, 3]], "rotation": [float(v) for v in quaternion_from_rotation(m[:3, :3])]}


def export_nuscenes(out: str | Path, frames_per_street: int = 4, seed: int = 0, version: str = "v1.0-mini") -> Path:
    """Write the mini split's ten scenes from generated streets into ``out`` in the nuScenes layout."""
    from PIL import Image

    root = Path(out)
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor", "log", "category", "lidarseg",
        "attribute", "visibility", "instance", "sample_annotation", "map")}
    sensors = {"LIDAR_TOP": "lidar", "CAM_FRONT": "camera"}
    tables["sensor"] = [{"token": _token("sensor", c), "channel": c, "modality": m} for c, m in sensors.items()]
    tables["category"] = [{"token": _token("category", name), "name": name, "description": f"generated {name}", "index": i}
                          for i, name in enumerate(CLASSES)]
    for folder in ("samples/LIDAR_TOP", "samples/CAM_FRONT", f"lidarseg/{version}", version):
        (root / folder).mkdir(parents=True, exist_ok=True)
    scenes = [("train", i, name) for i, name in enumerate(MINI_TRAIN)] + [("test", i, name) for i, name in enumerate(MINI_VAL)]
    for split, street, scene_name in scenes:
        data = StreetScenesDataset(split, size=(street + 1) * frames_per_street, frames_per_street=frames_per_street, seed=seed)
        frames = [data[street * frames_per_street + k] for k in range(frames_per_street)]
        log_token, scene_token = _token("log", scene_name), _token("scene", scene_name)
        tables["log"].append({"token": log_token, "logfile": f"generated-{scene_name}", "vehicle": "anymodal",
                              "date_captured": "2026-12-03", "location": STREET_KINDS[frames[0]["label"]]})
        samples = [_token("sample", scene_name, k) for k in range(frames_per_street)]
        tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": frames_per_street,
                                "first_sample_token": samples[0], "last_sample_token": samples[-1], "name": scene_name,
                                "description": frames[0]["text"]})
        calibrated = {}
        for channel, key in (("LIDAR_TOP", "lidar_top"), ("CAM_FRONT", "cam_front")):
            token = _token("calibrated_sensor", scene_name, channel)
            k = frames[0].get(f"{key}/intrinsics")
            tables["calibrated_sensor"].append({"token": token, "sensor_token": _token("sensor", channel),
                                                **_pose(frames[0][f"{key}/extrinsics"].double().numpy()),
                                                "camera_intrinsic": [] if k is None else np.asarray(intrinsics_to_ros(k.double().numpy())).reshape(3, 3).tolist()})
            calibrated[channel] = token
        for k, sample in enumerate(frames):
            index = street * frames_per_street + k
            time_us = (_frame_ns(index) // 1000) + (0 if split == "train" else 10_000_000_000)
            tables["sample"].append({"token": samples[k], "timestamp": time_us, "scene_token": scene_token,
                                     "prev": samples[k - 1] if k else "", "next": samples[k + 1] if k + 1 < len(samples) else ""})
            for channel, offset_us in (("LIDAR_TOP", 10_000), ("CAM_FRONT", 0)):
                token, stamp = _token("sample_data", scene_name, channel, k), time_us + offset_us
                pose_token = _token("ego_pose", scene_name, channel, k)
                tables["ego_pose"].append({"token": pose_token, "timestamp": stamp, **_pose(sample["ego_pose"].double().numpy())})
                name = f"n000-2026-12-03-00-00-00+0000__{channel}__{stamp}"
                if channel == "LIDAR_TOP":
                    points = sample["lidar_top"].numpy()
                    rows = np.column_stack([points[:, :3], points[:, 3] * 255.0, _rings(points, data.beams)]).astype("<f4")
                    filename = f"samples/LIDAR_TOP/{name}.pcd.bin"
                    rows.tofile(root / filename)
                    seg = f"lidarseg/{version}/{token}_lidarseg.bin"
                    sample["lidar_top/labels"].numpy().astype(np.uint8).tofile(root / seg)
                    tables["lidarseg"].append({"token": token, "sample_data_token": token, "filename": seg})
                    size = {"height": 0, "width": 0, "fileformat": "pcd"}
                else:
                    filename = f"samples/CAM_FRONT/{name}.jpg"
                    pixels = (sample["cam_front"].numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
                    Image.fromarray(pixels).save(root / filename, quality=95)
                    size = {"height": pixels.shape[0], "width": pixels.shape[1], "fileformat": "jpg"}
                prev = _token("sample_data", scene_name, channel, k - 1) if k else ""
                nxt = _token("sample_data", scene_name, channel, k + 1) if k + 1 < len(frames) else ""
                tables["sample_data"].append({"token": token, "sample_token": samples[k], "ego_pose_token": pose_token,
                                              "calibrated_sensor_token": calibrated[channel], "timestamp": stamp,
                                              "is_key_frame": True, "filename": filename, "prev": prev, "next": nxt, **size})
    for name, rows in tables.items():
        (root / version / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return root
