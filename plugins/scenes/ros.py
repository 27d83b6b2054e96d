"""ROS 2 sensor messages as arrays, and back: ``sensor_msgs/PointCloud2`` (any field layout),
``Image`` and ``CompressedImage``, ``CameraInfo``, ``tf2_msgs/TFMessage``. The byte-level (CDR)
encoding is the ``mcap-ros2-support`` package's; this module turns the decoded messages into what a
scene sample holds and writes the message definitions the recordings carry (the ROS 2 interface
files' fields, with their dependencies, in the ``ros2msg`` schema encoding).

Pixel convention: ROS's ``K`` puts pixel centres at integer coordinates; anymodal's geometry puts the
image's top-left corner at 0 (`anymodal.core.geometry`), so ``cx, cy`` differ by half a pixel, and
`intrinsics_from_ros` / `intrinsics_to_ros` convert.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ...core.errors import DataError

__all__ = ["MSGDEFS", "schema_type", "stamp_ns", "ros_time", "cloud_arrays", "cloud_message", "image_array",
           "image_message", "compressed_image_message", "intrinsics_from_ros", "intrinsics_to_ros", "resize_camera"]

_SEPARATOR = "\n" + "=" * 80 + "\n"
_TIME = "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec"
_HEADER = "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id"
_VECTOR3 = "MSG: geometry_msgs/Vector3\nfloat64 x\nfloat64 y\nfloat64 z"
_QUATERNION = "MSG: geometry_msgs/Quaternion\nfloat64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1"
_ROI = "MSG: sensor_msgs/RegionOfInterest\nuint32 x_offset\nuint32 y_offset\nuint32 height\nuint32 width\nbool do_rectify"


def _msgdef(body: str, *deps: str) -> str:
    return _SEPARATOR.join([body, *deps])


MSGDEFS = {
    "sensor_msgs/msg/PointCloud2": _msgdef(
        "std_msgs/Header header\nuint32 height\nuint32 width\nsensor_msgs/PointField[] fields\nbool is_bigendian\n"
        "uint32 point_step\nuint32 row_step\nuint8[] data\nbool is_dense", _HEADER, _TIME,
        "MSG: sensor_msgs/PointField\nuint8 INT8=1\nuint8 UINT8=2\nuint8 INT16=3\nuint8 UINT16=4\nuint8 INT32=5\n"
        "uint8 UINT32=6\nuint8 FLOAT32=7\nuint8 FLOAT64=8\nstring name\nuint32 offset\nuint8 datatype\nuint32 count"),
    "sensor_msgs/msg/Image": _msgdef(
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\nuint32 step\n"
        "uint8[] data", _HEADER, _TIME),
    "sensor_msgs/msg/CompressedImage": _msgdef("std_msgs/Header header\nstring format\nuint8[] data", _HEADER, _TIME),
    "sensor_msgs/msg/CameraInfo": _msgdef(
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring distortion_model\nfloat64[] d\nfloat64[9] k\n"
        "float64[9] r\nfloat64[12] p\nuint32 binning_x\nuint32 binning_y\nsensor_msgs/RegionOfInterest roi",
        _HEADER, _TIME, _ROI),
    "tf2_msgs/msg/TFMessage": _msgdef(
        "geometry_msgs/TransformStamped[] transforms",
        "MSG: geometry_msgs/TransformStamped\nstd_msgs/Header header\nstring child_frame_id\ngeometry_msgs/Transform transform",
        _HEADER, _TIME, "MSG: geometry_msgs/Transform\ngeometry_msgs/Vector3 translation\ngeometry_msgs/Quaternion rotation",
        _VECTOR3, _QUATERNION),
    "std_msgs/msg/String": "string data",
    "std_msgs/msg/Int32": "int32 data",
}

# PointField datatypes -> numpy scalar types (little-endian; a big-endian cloud swaps the byte order)
_FIELD_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}


def schema_type(name: str) -> str:
    """``sensor_msgs/msg/Image`` and ``sensor_msgs/Image`` alike as ``sensor_msgs/Image``."""
    return name.replace("/msg/", "/")


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ros_time(ns: int) -> dict[str, int]:
    return {"sec": int(ns // 1_000_000_000), "nanosec": int(ns % 1_000_000_000)}


def cloud_arrays(msg: Any, where: str) -> dict[str, np.ndarray]:
    """Each field of a ``PointCloud2`` as a ``[N]`` array in native byte order (points whose x, y or z is not finite are
    dropped: unorganised returns and the holes of organised clouds). Row padding (``row_step`` beyond
    ``width * point_step``) and gaps between fields are skipped by offset.

    Raises:
        DataError: naming ``where`` (file and topic) when the layout does not fit the data, a field is
            of an unknown type, or x, y or z is missing.
    """
    names = [f.name for f in msg.fields]
    missing = [axis for axis in "xyz" if axis not in names]
    if missing:
        raise DataError(f"{where}: PointCloud2 has no {', '.join(missing)} field (its fields: {', '.join(names) or 'none'})")
    order = ">" if msg.is_bigendian else "<"
    formats, offsets = [], []
    for f in msg.fields:
        if f.datatype not in _FIELD_TYPES or f.count < 1:
            raise DataError(f"{where}: PointCloud2 field {f.name!r} has datatype {f.datatype} and count {f.count}; "
                            f"datatypes 1-8 (INT8 to FLOAT64) with count >= 1 are defined")
        formats.append((order + _FIELD_TYPES[f.datatype], (f.count,)) if f.count > 1 else order + _FIELD_TYPES[f.datatype])
        offsets.append(f.offset)
    try:
        dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": msg.point_step})
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: PointCloud2 fields do not fit its point_step {msg.point_step}: {e}") from None
    data = msg.data if isinstance(msg.data, (bytes, bytearray)) else bytes(msg.data)
    rows, width = int(msg.height), int(msg.width)
    if msg.row_step < width * msg.point_step or len(data) < rows * msg.row_step:
        raise DataError(f"{where}: PointCloud2 of {rows}x{width} points of {msg.point_step} bytes (row_step "
                        f"{msg.row_step}) needs {rows * msg.row_step} bytes, it holds {len(data)}")
    raw = np.frombuffer(data, np.uint8, rows * msg.row_step).reshape(rows, msg.row_step)[:, :width * msg.point_step]
    points = np.ascontiguousarray(raw).view(dtype).reshape(-1)
    finite = np.isfinite(points["x"]) & np.isfinite(points["y"]) & np.isfinite(points["z"])
    return {name: points[name][finite].astype(points[name].dtype.newbyteorder("=")) for name in names}  # native order


def cloud_message(columns: dict[str, np.ndarray], frame_id: str, stamp: int, padding: int = 0) -> dict[str, Any]:
    """A ``PointCloud2`` (as the dict the writer takes) of float32 ``columns`` (``{"x": [N], ...}``;
    integer arrays keep their type), little-endian, ``padding`` unused bytes after each point."""
    names = list(columns)
    kinds = {"f4": 7, "f8": 8, "i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6}
    arrays = [np.asarray(columns[n]) for n in names]
    arrays = [a.astype("<f4") if a.dtype.kind == "f" and a.dtype.itemsize != 8 else a.astype(a.dtype.newbyteorder("<"))
              for a in arrays]
    offsets = np.cumsum([0] + [a.dtype.itemsize for a in arrays])
    step = int(offsets[-1]) + padding
    dtype = np.dtype({"names": names, "formats": [a.dtype for a in arrays], "offsets": [int(o) for o in offsets[:-1]],
                      "itemsize": step})
    out = np.zeros(len(arrays[0]), dtype)
    for n, a in zip(names, arrays):
        out[n] = a
    fields = [{"name": n, "offset": int(o), "datatype": kinds[a.dtype.str[1:]], "count": 1}
              for n, o, a in zip(names, offsets, arrays)]
    return {"header": {"stamp": ros_time(stamp), "frame_id": frame_id}, "height": 1, "width": len(out), "fields": fields,
            "is_bigendian": False, "point_step": step, "row_step": step * len(out), "data": out.tobytes(), "is_dense": True}


_CHANNELS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)), "bgra8": (4, (2, 1, 0)),
             "mono8": (1, (0, 0, 0))}


def image_array(msg: Any, schema: str, where: str) -> np.ndarray:
    """``[3, H, W]`` float32 in [0, 1] of an ``Image`` (rgb8, bgr8, rgba8, bgra8, mono8) or a
    ``CompressedImage`` (JPEG or PNG, decoded by Pillow).

    Raises:
        DataError: naming ``where`` for an encoding outside those or data that does not decode.
    """
    data = msg.data if isinstance(msg.data, (bytes, bytearray)) else bytes(msg.data)
    if schema_type(schema) == "sensor_msgs/CompressedImage":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as picture:
                rgb = np.asarray(picture.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{where}: CompressedImage ({msg.format or 'no format'}) does not decode: {e}") from None
        return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0
    if msg.encoding not in _CHANNELS:
        raise DataError(f"{where}: Image encoding {msg.encoding!r} is not read; known: {', '.join(_CHANNELS)}")
    channels, pick = _CHANNELS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < w * channels or len(data) < h * step:
        raise DataError(f"{where}: Image of {h}x{w} {msg.encoding} (step {step}) needs {h * step} bytes, it holds {len(data)}")
    pixels = np.frombuffer(data, np.uint8, h * step).reshape(h, step)[:, :w * channels].reshape(h, w, channels)
    return np.ascontiguousarray(pixels[..., list(pick)].transpose(2, 0, 1), dtype=np.float32) / 255.0


def image_message(image: np.ndarray, frame_id: str, stamp: int) -> dict[str, Any]:
    """An rgb8 ``Image`` of ``image [3, H, W]`` in [0, 1]."""
    pixels = np.ascontiguousarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))
    h, w = pixels.shape[:2]
    return {"header": {"stamp": ros_time(stamp), "frame_id": frame_id}, "height": h, "width": w, "encoding": "rgb8",
            "is_bigendian": 0, "step": 3 * w, "data": pixels.tobytes()}


def compressed_image_message(image: np.ndarray, frame_id: str, stamp: int, fmt: str = "jpeg") -> dict[str, Any]:
    """A ``CompressedImage`` (``jpeg`` at quality 95, or lossless ``png``) of ``image [3, H, W]`` in [0, 1]."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    Image.fromarray(pixels).save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return {"header": {"stamp": ros_time(stamp), "frame_id": frame_id}, "format": fmt, "data": buffer.getvalue()}


def intrinsics_from_ros(k: Sequence[float]) -> np.ndarray:
    """anymodal's ``[3, 3]`` intrinsics from a row-major ``K`` whose pixel centres are integers."""
    m = np.asarray(k, np.float64).reshape(3, 3).copy()
    m[:2, 2] += 0.5 * m[2, 2]
    return m


def intrinsics_to_ros(intrinsics: np.ndarray) -> list[float]:
    m = np.asarray(intrinsics, np.float64).copy()
    m[:2, 2] -= 0.5 * m[2, 2]
    return [float(v) for v in m.reshape(-1)]


def resize_camera(image: torch.Tensor, intrinsics: Optional[np.ndarray], size: Sequence[int],
                  where: str) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """``image [3, H, W]`` resized to ``size (H, W)`` by the image plugin's antialiased resize, and
    its ``[3, 3]`` intrinsics scaled to match (exact: the image's corner is at 0)."""
    from ..image.transforms import resize_image

    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise DataError(f"{where}: image_size must be [H, W], got {list(size)}")
    h, w = (int(s) for s in size)
    scale = np.diag([w / image.shape[2], h / image.shape[1], 1.0])
    return resize_image(image, h, w).clamp(0, 1), None if intrinsics is None else scale @ intrinsics
