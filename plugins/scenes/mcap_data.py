"""`McapScenesDataset`: scene samples from ROS 2 recordings in MCAP (the default bag format since
ROS 2 Iron), read through the ``mcap`` and ``mcap-ros2-support`` packages.

A config names the topics that make up each sensor; a frame is one message of the reference sensor
and, for every other topic, the message nearest its stamp (within ``tolerance`` seconds, else the
frame is skipped and counted). Extrinsics come from ``/tf_static`` and ``/tf``: each sensor's
``header.frame_id`` to ``ego_frame``, taken at the sensor's own stamp and expressed in the ego frame
at the reference stamp (the ego's motion between the two stamps, through ``world_frame``, is in it).
The sample is the scene contract of `anymodal.plugins.scenes.data`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import float_arg
from ...core.data import report_skipped
from ...core.errors import CorruptFileError, DataError
from ...core.registry import closest
from .recording import STAMP, MessageReader, RecordingIndex, TransformTree, index_recording
from .ros import cloud_arrays, image_array, intrinsics_from_ros, resize_camera, schema_type

__all__ = ["McapScenesDataset", "DEFAULT_SENSORS", "require_mcap"]

log = logging.getLogger(__name__)

# the layout `python -m anymodal.plugins.scenes export-mcap` writes (and a rig of one camera and one lidar)
DEFAULT_SENSORS = {
    "lidar_top": {"points": "/lidar_top/points", "labels": "label"},
    "cam_front": {"image": "/cam_front/image/compressed", "camera_info": "/cam_front/camera_info"},
}
_KEYS = {"points": ("points", "fields", "labels"), "image": ("image", "camera_info", "image_size")}
_SCHEMAS = {"points": ("sensor_msgs/PointCloud2",), "image": ("sensor_msgs/Image", "sensor_msgs/CompressedImage"),
            "camera_info": ("sensor_msgs/CameraInfo",), "text": ("std_msgs/String",),
            "label": ("std_msgs/Int32", "std_msgs/Int64", "std_msgs/UInt8", "std_msgs/Int16", "std_msgs/UInt16",
                      "std_msgs/UInt32", "std_msgs/Int8")}


def require_mcap(what: str) -> None:
    try:
        import mcap  # noqa: F401
        import mcap_ros2  # noqa: F401
    except ImportError:
        raise DataError(f"{what} reads MCAP through the mcap and mcap-ros2-support packages: "
                        "pip install 'anymodal[mcap]'") from None


def _recordings(path: Any, split: str) -> list[Path]:
    """A file, a list of files, or a folder: its ``<split>/`` subfolder's ``*.mcap`` where it has one,
    else its own."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    files: list[Path] = []
    for p in map(lambda x: Path(str(x)).expanduser(), paths):
        if p.is_dir():
            folder = p / split if (p / split).is_dir() else p
            found = sorted(folder.glob("*.mcap"))
            if not found:
                raise DataError(f"no *.mcap recordings in {str(folder)!r}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"MCAP recording {str(p)!r} does not exist")
    if not files:
        raise DataError("mcap_scenes needs path: a recording, a list of them, or a folder of *.mcap")
    return files


def _check_sensors(sensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, node in sensors.items():
        node = dict(node or {})
        kinds = [k for k in _KEYS if k in node]
        if len(kinds) != 1:
            raise DataError(f"mcap_scenes sensor {name!r} names its topic as points: (a PointCloud2) or image: "
                            f"(an Image or CompressedImage), exactly one; got keys {sorted(node)}")
        for key in node:
            if key not in _KEYS[kinds[0]]:
                near = closest(key, list(_KEYS[kinds[0]]))
                raise DataError(f"mcap_scenes sensor {name!r} has unknown key {key!r}"
                                + (f"; did you mean {near[0]!r}?" if near else "") + f"; keys: {', '.join(_KEYS[kinds[0]])}")
        node["kind"] = kinds[0]
        if kinds[0] == "points":
            node.setdefault("fields", ["x", "y", "z", "intensity"])
        out[str(name)] = node
    if not out:
        raise DataError("mcap_scenes needs at least one sensor in sensors:")
    return out


class McapScenesDataset(Dataset):
    """Frames of calibrated sensors from MCAP recordings.

    Args:
        path: a recording, a list of them, or a folder (``<folder>/<split>/*.mcap`` where that exists).
        split: which subfolder of a folder ``path`` to read (``train``, ``test``).
        sensors: name -> topics. A point sensor (lidar, radar): ``points`` (a PointCloud2 topic),
            ``fields`` (the columns of ``<name>``, default x, y, z, intensity), ``labels`` (a field
            read as ``<name>/labels``). A camera: ``image`` (Image or CompressedImage),
            ``camera_info`` (CameraInfo: the intrinsics), ``image_size`` ([H, W]: resized on read,
            intrinsics scaled with it). Default: the layout ``export-mcap`` writes.
        reference: the sensor whose messages make the frames (default the first).
        tolerance: seconds between the reference stamp and another sensor's nearest message beyond
            which the frame is dropped (counted in ``dropped``, logged; ``missing: error`` raises instead).
        ego_frame, world_frame: the tf frames of the vehicle and of the world (``ego_pose`` is
            world <- ego at the reference stamp; ``world_frame: null`` leaves it out and takes the
            extrinsics without motion compensation).
        text_topic, label_topic: a std_msgs/String topic read as ``text`` and an integer one read as
            ``label`` (null: none).
        strict: refuse a damaged recording (cut by a crash, a chunk that does not decompress);
            by default its readable prefix is used and the loss is logged and listed in ``skipped``.
        index_dir: where the index caches go (default: beside each recording, else the data cache).
    """

    def __init__(self, path: Any, split: str = "train", sensors: Optional[Mapping[str, Any]] = None,
                 reference: Optional[str] = None, tolerance: float = 0.05, ego_frame: str = "base_link",
                 world_frame: Optional[str] = "map", text_topic: Optional[str] = "/caption",
                 label_topic: Optional[str] = "/street_kind", missing: str = "skip", strict: bool = False,
                 index_dir: Optional[str] = None) -> None:
        require_mcap("mcap_scenes")
        self.sensors = _check_sensors(DEFAULT_SENSORS if sensors is None else sensors)
        self.reference = reference or next(iter(self.sensors))
        if self.reference not in self.sensors:
            raise DataError(f"mcap_scenes reference {self.reference!r} is not one of its sensors: {', '.join(self.sensors)}")
        self.tolerance_ns = int(float_arg("tolerance", tolerance) * 1e9)
        if missing not in ("skip", "error") or not isinstance(strict, bool):
            raise DataError(f"mcap_scenes missing must be skip or error and strict true or false; got "
                            f"missing={missing!r}, strict={strict!r}")
        self.ego_frame, self.world_frame = ego_frame, world_frame
        self.text_topic, self.label_topic = text_topic, label_topic
        self.skipped: list[tuple[str, str]] = []  # damaged recordings (their readable prefix is used)
        self.dropped: list[tuple[str, str]] = []  # frames without a partner within tolerance, or an ego pose
        self.readers: list[MessageReader] = []
        self.trees: list[TransformTree] = []
        self.frame_ids: list[dict[str, str]] = []
        self.frames: list[tuple[int, dict[str, int]]] = []  # (recording, role -> message row)
        for path_ in _recordings(path, split):
            index = index_recording(path_, index_dir)
            if index.lost:
                if strict:
                    raise CorruptFileError(str(path_), index.lost)
                log.warning("%s: %s; using the readable prefix (%d messages)", path_, index.lost, len(index.messages))
                self.skipped.append((str(path_), index.lost))
            self._add_recording(index, missing)
        report_skipped(self.skipped, str(path), "recording tail")
        if self.dropped:
            log.warning("dropped %d of %d frames under %s: %s (first: %s)", len(self.dropped),
                        len(self.dropped) + len(self.frames), path, self.dropped[0][1], self.dropped[0][0])
        if not self.frames:
            reasons = "; ".join(f"{p}: {r}" for p, r in [*self.skipped, *self.dropped][:3])
            raise DataError(f"mcap_scenes found no complete frame in {path}" + (f" ({reasons})" if reasons else ""))

    # ---- indexing: which messages make each frame ------------------------------------------------

    def _roles(self) -> dict[str, tuple[str, str]]:
        """role -> (topic, kind of message): each sensor's data, each camera's info, text, label."""
        roles = {}
        for name, node in self.sensors.items():
            roles[name] = (node[node["kind"]], node["kind"])
            if node.get("camera_info"):
                roles[f"{name}/camera_info"] = (node["camera_info"], "camera_info")
        if self.text_topic:
            roles["text"] = (self.text_topic, "text")
        if self.label_topic:
            roles["label"] = (self.label_topic, "label")
        return roles

    def _add_recording(self, index: RecordingIndex, missing: str) -> None:
        file = index.path
        rows = {}
        for role, (topic, kind) in self._roles().items():
            schema = index.topic_schema(topic)
            rows[role] = index.topic_rows(topic)
            if index.lost and (schema is None or not len(rows[role])):
                # the part of a cut recording that was read has none of this topic yet: no frame in it
                self.skipped[-1] = (index.path, f"{index.lost}; the readable part has no {topic} message")
                return
            if schema is None:
                near = closest(topic, index.topics())
                raise DataError(f"{file}: no topic {topic!r} ({role})" + (f"; did you mean {near[0]!r}?" if near else "")
                                + f"; its topics: {', '.join(index.topics()) or 'none'}")
            if schema_type(schema["name"]) not in _SCHEMAS[kind] or schema["encoding"] != "ros2msg":
                raise DataError(f"{file}: topic {topic!r} ({role}) carries {schema['name'] or 'no schema'} "
                                f"({schema['encoding'] or 'no encoding'}); {kind} reads {' or '.join(_SCHEMAS[kind])} "
                                "in the ros2msg encoding")
            if not len(rows[role]):
                raise DataError(f"{file}: topic {topic!r} ({role}) has no messages")
        recording = len(self.readers)
        reader = MessageReader(index)
        tree = TransformTree(index, self.tolerance_ns)
        self.readers.append(reader)
        self.trees.append(tree)
        self.frame_ids.append(self._check_frames(index, reader, tree, rows))
        stamps = {role: index.messages[r, STAMP] for role, r in rows.items()}
        for i, t in enumerate(stamps[self.reference]):
            picked, reason = {self.reference: int(rows[self.reference][i])}, None
            for role, s in stamps.items():
                if role == self.reference:
                    continue
                j = _nearest(s, int(t))
                gap = abs(int(s[j]) - int(t))
                if gap > self.tolerance_ns and not role.endswith("/camera_info"):
                    reason = f"no {role} message within {self.tolerance_ns / 1e9:g} s (nearest {gap / 1e9:.3f} s away)"
                    break
                picked[role] = int(rows[role][j])
            if reason is None and self.world_frame:
                try:
                    tree.lookup(self.world_frame, self.ego_frame, int(t))
                except LookupError as e:
                    reason = f"no ego pose: {e}"
            where = f"{file} at {(int(t) - index.start_ns) / 1e9:.3f} s"
            if reason is not None:
                if missing == "error":
                    raise DataError(f"{where}: {reason} (missing: skip drops such frames)")
                self.dropped.append((where, reason))
                continue
            self.frames.append((recording, picked))

    def _check_frames(self, index: RecordingIndex, reader: MessageReader, tree: TransformTree,
                      rows: dict[str, np.ndarray]) -> dict[str, str]:
        """Each sensor's frame_id (from its first message), refused when tf cannot place it on the ego."""
        frame_ids = {}
        for name in self.sensors:
            _, msg = reader.read(int(rows[name][0]))
            frame = msg.header.frame_id.lstrip("/")
            t = int(index.messages[rows[name][0], STAMP])
            try:
                tree.lookup(self.ego_frame, frame, t)
            except LookupError as e:
                topic = self.sensors[name][self.sensors[name]["kind"]]
                raise DataError(f"{index.path}: no transform from {frame!r} (the frame_id of {topic}) to ego frame "
                                f"{self.ego_frame!r} in /tf_static or /tf ({e}); frames there: "
                                f"{', '.join(tree.frames()) or 'none'}") from None
            frame_ids[name] = frame
        return frame_ids

    # ---- reading a frame -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, Any]:
        recording, picked = self.frames[i]
        reader, tree = self.readers[recording], self.trees[recording]
        index = reader.index
        t_ref = int(index.messages[picked[self.reference], STAMP])
        sample: dict[str, Any] = {"frame": f"{Path(index.path).stem}/{t_ref}"}
        ego_pose = tree.lookup(self.world_frame, self.ego_frame, t_ref) if self.world_frame else None
        if ego_pose is not None:
            sample["ego_pose"] = torch.from_numpy(ego_pose.astype(np.float32))
        for name, node in self.sensors.items():
            row = picked[name]
            schema, msg = reader.read(row)
            where = f"{index.path}: topic {node[node['kind']]}"
            t = int(index.messages[row, STAMP])
            frame = msg.header.frame_id.lstrip("/") or self.frame_ids[recording][name]
            try:
                if ego_pose is not None:  # sensor at its stamp -> world -> ego at the reference stamp
                    extrinsics = np.linalg.inv(ego_pose) @ tree.lookup(self.world_frame, frame, t)
                else:
                    extrinsics = tree.lookup(self.ego_frame, frame, t)
            except LookupError as e:
                raise DataError(f"{where}: cannot place frame {frame!r} at {(t - index.start_ns) / 1e9:.3f} s: {e}") from None
            sample[f"{name}/extrinsics"] = torch.from_numpy(extrinsics.astype(np.float32))
            sample[f"{name}/timestamp"] = (t - index.start_ns) / 1e9
            if node["kind"] == "points":
                sample |= self._points(name, node, msg, where)
            else:
                sample |= self._image(name, node, schema, msg, reader, picked, where)
        if "text" in picked:
            sample["text"] = str(reader.read(picked["text"])[1].data)
        if "label" in picked:
            sample["label"] = int(reader.read(picked["label"])[1].data)
        return sample

    def _points(self, name: str, node: dict[str, Any], msg: Any, where: str) -> dict[str, Any]:
        columns = cloud_arrays(msg, where)
        absent = [f for f in [*node["fields"], *([node["labels"]] if node.get("labels") else [])] if f not in columns]
        if absent:
            raise DataError(f"{where}: PointCloud2 has no field {', '.join(map(repr, absent))} that sensor {name!r} "
                            f"reads (its fields: {', '.join(columns)})")
        out = {name: torch.from_numpy(np.stack([columns[f].astype(np.float32) for f in node["fields"]], 1))}
        if node.get("labels"):
            out[f"{name}/labels"] = torch.from_numpy(columns[node["labels"]].astype(np.int64))
        return out

    def _image(self, name: str, node: dict[str, Any], schema: str, msg: Any, reader: MessageReader,
               picked: dict[str, int], where: str) -> dict[str, Any]:
        image = torch.from_numpy(image_array(msg, schema, where))
        out: dict[str, Any] = {}
        if f"{name}/camera_info" in picked:
            _, info = reader.read(picked[f"{name}/camera_info"])
            if (info.width, info.height) not in ((0, 0), (image.shape[2], image.shape[1])):
                raise DataError(f"{where}: CameraInfo on {node['camera_info']} is for {info.width}x{info.height} "
                                f"images, the image is {image.shape[2]}x{image.shape[1]}")
            k = intrinsics_from_ros(info.k)
            if not (np.isfinite(k).all() and k[0, 0] > 0 and k[1, 1] > 0):
                raise DataError(f"{where}: CameraInfo on {node['camera_info']} has no usable K: {list(info.k)}")
            out[f"{name}/intrinsics"] = k
        if node.get("image_size"):
            image, k = resize_camera(image, out.get(f"{name}/intrinsics"), node["image_size"], where)
            if k is not None:
                out[f"{name}/intrinsics"] = k
        out[name] = image
        if f"{name}/intrinsics" in out:
            out[f"{name}/intrinsics"] = torch.from_numpy(out[f"{name}/intrinsics"].astype(np.float32))
        return out


def _nearest(stamps: np.ndarray, t: int) -> int:
    """The position in sorted ``stamps`` of the one nearest ``t``."""
    j = int(np.searchsorted(stamps, t))
    if j == len(stamps) or (j > 0 and t - stamps[j - 1] <= stamps[j] - t):
        j -= 1
    return j
