"""`StreetScenesDataset`: frames of generated streets, each a scene sample of two calibrated sensors.

A sample holds (the scene contract: ``<sensor>`` and ``<sensor>/<field>`` keys)::

    cam_front             [3, H, W] float32 in [0, 1]      cam_front/intrinsics  [3, 3]
    cam_front/extrinsics  [4, 4] camera -> ego (OpenCV axes: x right, y down, z forward)
    cam_front/timestamp   float seconds                    lidar_top/timestamp   float seconds
    lidar_top             [N, 4] x, y, z, intensity in the lidar's frame
    lidar_top/extrinsics  [4, 4] lidar -> ego              lidar_top/labels      [N] long, `CLASSES`
    ego_pose              [4, 4] ego -> world              frame                 "train/000012"
    text                  a caption of what the camera sees    label             the street's kind

and with ``radar=True`` a forward 4-D imaging radar in the front bumper::

    radar_front           [M, 5] x, y, z, Doppler (m/s, + receding), RCS (dBsm) in the radar's frame
    radar_front/extrinsics [4, 4] radar -> ego             radar_front/timestamp float seconds
    radar_front/labels    [M] long, `CLASSES`

Frames are generated on read (tens of milliseconds: both sensors are ray cast), each from its own
seeded stream, so a frame reads the same every time and needs no cache.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import float_arg, int_arg
from ...core.errors import DataError
from .world import (CLASSES, COLOURS, STREET_KINDS, beam_directions, lidar_returns, make_world, radar_directions,
                    radar_returns, render)

__all__ = ["StreetScenesDataset", "CLASSES", "overlay", "save_overlay", "caption"]

CAMERA_HEIGHT, LIDAR_HEIGHT, RADAR_HEIGHT = 1.6, 1.9, 0.6
EGO_SPEED = 10.0  # m/s along the ego's heading: what the radar's Doppler of standing things shows
_COUNTED = ("car", "pedestrian", "pole", "tree")
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _rigid(yaw: float = 0.0, pitch: float = 0.0, translation: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """A 4x4 rigid transform: yaw about z, then pitch (nose down for positive), then a translation."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    yaw_m = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    pitch_m = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    m = np.eye(4)
    m[:3, :3] = yaw_m @ pitch_m
    m[:3, 3] = translation
    return m


# camera axes (x right, y down, z forward) as columns in a forward-x, left-y, up-z body frame
_CAMERA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def caption(kind: int, counts: dict[str, int]) -> str:
    """``"a city street with two cars, a pedestrian and a tree"`` from the classes the camera sees."""
    parts = []
    for name in _COUNTED:
        n = counts.get(name, 0)
        if n:
            word = "pedestrians" if name == "pedestrian" and n > 1 else name + ("s" if n > 1 else "")
            parts.append(f"a {word}" if n == 1 else f"{_NUMBERS[min(n, 9)]} {word}")
    things = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "")
    return f"a {STREET_KINDS[kind]}" + (f" with {things}" if things else "")


class StreetScenesDataset(Dataset):
    """Frames of generated streets seen by a front camera and a roof lidar.

    Args:
        split: ``train`` or ``test`` (different streets: their own seed streams).
        size: frames (default 800 for train, 200 for test); ``frames_per_street`` consecutive
            frames come from each street.
        frames_per_street: frames along one street, ``spacing`` metres apart.
        image_size: camera ``(H, W)``, each a multiple of 16.
        fov: the camera's horizontal field of view, degrees.
        beams, azimuth_steps: the spinning lidar (32 beams from -25 to +10 degrees).
        max_range: lidar range, metres.
        radar: add the front radar (``radar_front``): +-60 degrees, 4 elevations, 80 m. Its returns
            come from their own random stream, so the camera and lidar read the same either way.
        cache: keep each frame in memory once generated (about 0.7 MB a frame): for runs that read
            every frame many times, where ray casting would otherwise dominate the step.
        seed: the generator's seed.
    """

    classes = CLASSES

    def __init__(self, split: str, size: int | None = None, frames_per_street: int = 4, spacing: float = 12.0,
                 image_size: Sequence[int] = (128, 256), fov: float = 90.0, beams: int = 32, azimuth_steps: int = 720,
                 max_range: float = 60.0, radar: bool = False, cache: bool = False, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise DataError(f"street scenes split must be 'train' or 'test', got {split!r}")
        self.split, self.seed = split, int_arg("seed", seed, 0)
        self.size = int_arg("size", size if size is not None else (800 if split == "train" else 200), 1)
        self.frames_per_street = int_arg("frames_per_street", frames_per_street, 1)
        self.spacing = float_arg("spacing", spacing)
        if len(image_size) != 2 or any(int(s) < 16 or int(s) % 16 for s in image_size):
            raise DataError(f"street scenes image_size must be (H, W), each a multiple of 16, got {list(image_size)}")
        self.height, self.width = (int(s) for s in image_size)
        fov = float_arg("fov", fov)
        self.beams, self.azimuth_steps = int_arg("beams", beams, 1), int_arg("azimuth_steps", azimuth_steps, 8)
        self.max_range = float_arg("max_range", max_range)
        if not (self.spacing >= 0 and 10 <= fov <= 150 and self.max_range >= 1):
            raise DataError(f"street scenes need spacing >= 0, fov in [10, 150] degrees and max_range >= 1 m; got "
                            f"spacing={spacing}, fov={fov}, max_range={max_range}")
        focal = self.width / 2 / math.tan(math.radians(fov) / 2)
        self.intrinsics = np.array([[focal, 0, self.width / 2], [0, focal, self.height / 2], [0, 0, 1.0]])
        self.directions = beam_directions(self.beams, self.azimuth_steps)
        if not isinstance(radar, bool):
            raise DataError(f"street scenes radar must be true or false, got {radar!r}")
        self.radar = radar_directions() if radar else None
        if not isinstance(cache, bool):
            raise DataError(f"street scenes cache must be true or false, got {cache!r}")
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None
        self.skipped: list[tuple[str, str]] = []  # generated: nothing to skip

    def __len__(self) -> int:
        return self.size

    def calibration(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ego_pose, cam_to_ego, lidar_to_ego)`` of frame ``index``: the ego along the street with a
        little heading noise; the rig's mounts vary a little per street, as real calibrations do."""
        street, step = divmod(index, self.frames_per_street)
        rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), street, 11])
        lane = rng.choice([-1.8, 1.8])
        ego = _rigid(rng.normal(0, 0.03) + (math.pi if lane > 0 and rng.uniform() < 0.3 else 0.0), 0.0,
                     (10.0 + step * self.spacing, lane, 0.0))
        cam = _rigid(rng.normal(0, 0.01), math.radians(rng.uniform(2, 6)), (1.2, rng.normal(0, 0.05), CAMERA_HEIGHT))
        cam[:3, :3] = cam[:3, :3] @ _CAMERA_AXES
        lidar = _rigid(rng.normal(0, 0.02), 0.0, (0.0, 0.0, LIDAR_HEIGHT))
        return ego, cam, lidar

    def radar_mount(self, index: int) -> np.ndarray:
        """The front radar's radar -> ego transform for frame ``index``'s street (a stream of its own)."""
        rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), index // self.frames_per_street, 19])
        return _rigid(rng.normal(0, 0.01), 0.0, (3.7, rng.normal(0, 0.03), RADAR_HEIGHT))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache is None:
            return self.frame(index)[0]
        if index not in self.cache:
            self.cache[index] = self.frame(index)[0]
        return dict(self.cache[index])  # a new dict: transforms replace fields, never the cached ones

    def frame(self, index: int) -> tuple[dict[str, Any], np.ndarray]:
        """Frame ``index``'s sample and the camera's class map ``[H, W]`` (-1: sky), rendered together."""
        if not 0 <= index < self.size:
            raise IndexError(f"street scenes {self.split} has {self.size} frames, not index {index}")
        world = make_world(self.seed, self.split, index // self.frames_per_street)
        ego, cam, lidar = self.calibration(index)
        rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), index, 13])
        image, classes = render(world, self.intrinsics, ego @ cam, self.height, self.width, rng)
        points, labels = lidar_returns(world, ego @ lidar, self.directions, self.max_range, rng)
        t = index * 0.1
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        sample = {"cam_front": torch.from_numpy(image), "cam_front/intrinsics": f32(self.intrinsics),
                  "cam_front/extrinsics": f32(cam), "cam_front/timestamp": t,
                  "lidar_top": torch.from_numpy(points), "lidar_top/extrinsics": f32(lidar),
                  "lidar_top/labels": torch.from_numpy(labels), "lidar_top/timestamp": t + 0.01,
                  "ego_pose": f32(ego), "frame": f"{self.split}/{index:06d}",
                  "text": caption(world.kind, self._visible(world, ego @ cam)), "label": world.kind}
        if self.radar is not None:
            mount = self.radar_mount(index)
            radar_rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), index, 23])
            velocity = ego[:3, :3] @ np.array([EGO_SPEED, 0.0, 0.0])
            returns, radar_labels = radar_returns(world, ego @ mount, velocity, self.radar, 80.0, radar_rng)
            sample |= {"radar_front": torch.from_numpy(returns), "radar_front/extrinsics": f32(mount),
                       "radar_front/labels": torch.from_numpy(radar_labels), "radar_front/timestamp": t + 0.02}
        return sample, classes

    def _visible(self, world: Any, cam_to_world: np.ndarray) -> dict[str, int]:
        """Objects of the counted classes whose centre is in front of the camera and inside its image,
        within 50 m: what a caption of this frame may name."""
        centres = np.concatenate([world.boxes[:, :3], np.column_stack([world.cylinders[:, :2],
                                                                       (world.cylinders[:, 3] + world.cylinders[:, 4]) / 2])])
        cls = np.concatenate([world.box_class, world.cylinder_class])
        # a tree is two cylinders (trunk, crown) at one place: count it once
        tree = CLASSES.index("tree")
        trunk = np.ones(len(cls), bool)
        nb = len(world.boxes)
        trunk[nb:] = ~((cls[nb:] == tree) & (world.cylinders[:, 3] > 0))
        world_to_cam = np.linalg.inv(cam_to_world)
        local = centres @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        uv = local @ self.intrinsics.T
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = uv[:, 0] / local[:, 2], uv[:, 1] / local[:, 2]
        seen = (local[:, 2] > 1.0) & (local[:, 2] < 50.0) & (u >= 0) & (u < self.width) & (v >= 0) & (v < self.height) & trunk
        return {name: int(((cls == CLASSES.index(name)) & seen).sum()) for name in _COUNTED}


def overlay(sample: dict[str, Any]) -> np.ndarray:
    """The camera image ``[H, W, 3]`` uint8 with the lidar points that project into it drawn in their
    class colour (nearest on top): what the calibration says each sensor sees of the other."""
    image = (sample["cam_front"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    h, w = image.shape[:2]
    points = sample["lidar_top"].numpy()[:, :3].astype(np.float64)
    ego = points @ sample["lidar_top/extrinsics"].numpy()[:3, :3].T.astype(np.float64) + sample["lidar_top/extrinsics"].numpy()[:3, 3]
    cam_to_ego = sample["cam_front/extrinsics"].numpy().astype(np.float64)
    local = (ego - cam_to_ego[:3, 3]) @ cam_to_ego[:3, :3]
    uvw = local @ sample["cam_front/intrinsics"].numpy().T.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
    inside = (local[:, 2] > 0.1) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    order = np.argsort(-local[inside, 2])  # far first, so near points are drawn over them
    rows, cols = v[inside][order].astype(int), u[inside][order].astype(int)
    colour = (COLOURS[sample["lidar_top/labels"].numpy()[inside][order]] * 255).astype(np.uint8)
    out = image.copy()
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):  # 2x2 dots: visible at this size
        out[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)] = colour
    return out


def save_overlay(sample: dict[str, Any], path: str | Path) -> Path:
    """Write `overlay` of ``sample`` as a PNG (side by side with the plain image)."""
    from PIL import Image

    picture = np.concatenate([(sample["cam_front"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8), overlay(sample)], 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path
