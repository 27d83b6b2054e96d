"""Generated point-cloud data: object shapes and simulated spinning-lidar sweeps of street scenes.

Both are pure functions of their arguments and seed (train and test use different seed streams),
generated on first use and cached as an ``.npz`` in :func:`~anymodal.plugins.lidar.data.lidar_cache_dir`, written
to a temporary name and renamed into place; a stale or unreadable cache is regenerated.

* :class:`ShapesDataset` -- ~1024 points sampled from the surfaces of 10 shape classes, randomly
  scaled per axis, rotated, seen from one side (points beyond a random plane dropped, like a
  single-view scan) and noisy: ``{"points": [P, 3], "label", "text": "a cone"}``.
* :class:`LidarSweepsDataset` -- a 32-beam spinning lidar moving along a street, ray-cast (all rays
  at once in NumPy) against a ground plane, boxes (cars, buildings, guard rails) and vertical
  cylinders (poles, trees): ``{"points": [N, 4 or 5], "label": scene type, "text": caption}``.
  The cache holds the scene layouts; sweeps are ray-cast when read (tens of milliseconds), their
  noise seeded per (scene, sweep) so every read is identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import float_arg, int_arg, range_arg
from ...core.errors import DataError
from .data import concat_sweeps, lidar_cache_dir

__all__ = ["SHAPE_CLASSES", "SCENE_TYPES", "ShapesDataset", "LidarSweepsDataset", "raycast", "cached_arrays"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SPLITS = ("train", "test")


def cached_arrays(path: str, meta: dict[str, Any], make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored at ``path`` if it was made with ``meta``, else ``make()``'s, written atomically."""
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                if json.loads(str(data["meta"])) != json.loads(json.dumps(meta)):  # tuples come back as lists
                    raise ValueError("it was made with other settings")
                return {k: data[k] for k in data.files if k != "meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("cache %s is unreadable or stale (%s: %s); regenerating it", path, type(exc).__name__, exc)
    arrays = make()
    folder, tmp = os.path.dirname(path), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        logger.warning("could not write cache %s (%s); keeping the data in memory only", path, exc)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return arrays


def _split_rng(seed: int, split: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS.index(split), FORMAT_VERSION, *more])


def _check_split(split: str, what: str) -> None:
    if split not in _SPLITS:
        raise DataError(f"unknown {what} split {split!r}; valid splits: {list(_SPLITS)}")


# --------------------------------------------------------------------------------------------
# shapes: area-uniform samplers of canonical surfaces (about [-1, 1]^3), vectorized over points


def _ring(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _disk(rng, n, radius, z):
    xy = _ring(rng, n) * radius * np.sqrt(rng.uniform(0.0, 1.0, n))[:, None]
    return np.column_stack([xy, np.full(n, z)])


def _tube(rng, n, radius, z0, z1):
    return np.column_stack([_ring(rng, n) * radius, rng.uniform(z0, z1, n)])


def _cone_side(rng, n, radius, z_base, z_apex):
    t = np.sqrt(rng.uniform(0.0, 1.0, n))  # distance from the apex: area grows linearly with it
    return np.column_stack([_ring(rng, n) * (radius * t)[:, None], z_apex - (z_apex - z_base) * t])


def _sphere(rng, n, radius=1.0, z=0.0, half=0):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    if half:
        v[:, 2] = half * np.abs(v[:, 2])
    return v * radius + [0.0, 0.0, z]


def _torus(rng, n, big=0.75, small=0.28):
    # tube angle phi has density ~ (big + small cos phi): rejection, vectorized, topped up if short
    out = np.empty((0, 3))
    while len(out) < n:
        phi = rng.uniform(0.0, 2.0 * np.pi, 2 * n)
        phi = phi[rng.uniform(0.0, big + small, 2 * n) < big + small * np.cos(phi)]
        ring = _ring(rng, len(phi)) * (big + small * np.cos(phi))[:, None]
        out = np.concatenate([out, np.column_stack([ring, small * np.sin(phi)])])
    return out[:n]


def _mesh(rng, n, triangles):
    tri = np.asarray(triangles, dtype=np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(tri), n, p=area / area.sum())
    u, v = rng.uniform(0.0, 1.0, (2, n))
    flip = u + v > 1.0
    u, v = np.where(flip, 1.0 - u, u), np.where(flip, 1.0 - v, v)
    a, b, c = tri[pick, 0], tri[pick, 1], tri[pick, 2]
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def _mixture(rng, n, parts):
    """``n`` points from ``parts`` = [(area, sampler(rng, m))], each part in proportion to its area."""
    areas = np.array([a for a, _ in parts], dtype=np.float64)
    counts = rng.multinomial(n, areas / areas.sum())
    return np.concatenate([sample(rng, m) for (_, sample), m in zip(parts, counts)])


def _quads(*quads):
    """Triangles of planar quads given as 4 corners in order."""
    return [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]


_C = 0.8  # cube half side
_CUBE = _quads(*[[[s * p[(k + 0) % 3], s * p[(k + 1) % 3], s * p[(k + 2) % 3]] for p in
                  ([_C, -_C, -_C], [_C, _C, -_C], [_C, _C, _C], [_C, -_C, _C])] for k in range(3) for s in (1, -1)])
_BASE = [[-0.9, -0.9, -0.7], [0.9, -0.9, -0.7], [0.9, 0.9, -0.7], [-0.9, 0.9, -0.7]]
_PYRAMID = _quads(_BASE) + [(_BASE[i], _BASE[(i + 1) % 4], [0.0, 0.0, 1.0]) for i in range(4)]
_OCTAHEDRON = [([sx, 0, 0], [0, sy, 0], [0, 0, sz]) for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]
_TRI = [[0.9 * math.cos(a), 0.9 * math.sin(a)] for a in np.radians([90, 210, 330])]
_PRISM = ([tuple([*p, z] for p in _TRI) for z in (-0.8, 0.8)]
          + _quads(*[[[*_TRI[i], -0.8], [*_TRI[(i + 1) % 3], -0.8], [*_TRI[(i + 1) % 3], 0.8], [*_TRI[i], 0.8]]
                     for i in range(3)]))

_PI = np.pi
_SHAPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sphere": lambda rng, n: _sphere(rng, n),
    "cube": lambda rng, n: _mesh(rng, n, _CUBE),
    "cylinder": lambda rng, n: _mixture(rng, n, [(2 * _PI * 0.7 * 2.0, lambda r, m: _tube(r, m, 0.7, -1.0, 1.0)),
                                                  (_PI * 0.49, lambda r, m: _disk(r, m, 0.7, -1.0)),
                                                  (_PI * 0.49, lambda r, m: _disk(r, m, 0.7, 1.0))]),
    "cone": lambda rng, n: _mixture(rng, n, [(_PI * 0.9 * math.hypot(0.9, 2.0), lambda r, m: _cone_side(r, m, 0.9, -1.0, 1.0)),
                                              (_PI * 0.81, lambda r, m: _disk(r, m, 0.9, -1.0))]),
    "torus": lambda rng, n: _torus(rng, n),
    "pyramid": lambda rng, n: _mesh(rng, n, _PYRAMID),
    "capsule": lambda rng, n: _mixture(rng, n, [(2 * _PI * 0.45 * 1.1, lambda r, m: _tube(r, m, 0.45, -0.55, 0.55)),
                                                 (2 * _PI * 0.2025, lambda r, m: _sphere(r, m, 0.45, 0.55, 1)),
                                                 (2 * _PI * 0.2025, lambda r, m: _sphere(r, m, 0.45, -0.55, -1))]),
    "octahedron": lambda rng, n: _mesh(rng, n, _OCTAHEDRON),
    "prism": lambda rng, n: _mesh(rng, n, _PRISM),
    "hemisphere": lambda rng, n: _mixture(rng, n, [(2 * _PI, lambda r, m: _sphere(r, m, 1.0, -0.4, 1)),
                                                    (_PI, lambda r, m: _disk(r, m, 1.0, -0.4))]),
}
SHAPE_CLASSES = tuple(_SHAPES)


def _random_rotation(rng: np.random.Generator, about_z_only: bool) -> np.ndarray:
    if about_z_only:
        c, s = _ring(rng, 1)[0]
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)  # uniform on SO(3)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class ShapesDataset(Dataset):
    """Partial, noisy, randomly posed scans of 10 shape classes, balanced.

    Each object: ``points`` surface samples of its class, scaled by ``scale`` times a per-axis
    factor in ``anisotropy``, rotated (any 3-D rotation, or about z with ``rotation="z"``), with
    probability ``partial`` cut by a random plane keeping a share in ``keep`` (one side seen),
    Gaussian noise of std ``noise``, and centred on its mean.

    Args:
        split: ``"train"`` or ``"test"`` (independent seed streams).
        size: Objects (default 4000 for train, 1000 for test).
        points: Points per object.
        noise, scale, anisotropy, partial, keep, rotation: As above.
        seed: Seed of the whole construction.
        cache_dir: Folder of the cache (default :func:`~anymodal.plugins.lidar.data.lidar_cache_dir`).
    """

    classes = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)

    def __init__(self, split: str, size: int | None = None, points: int = 1024, noise: float = 0.01,
                 scale: Sequence[float] = (0.6, 1.2), anisotropy: Sequence[float] = (0.7, 1.4), partial: float = 0.8,
                 keep: Sequence[float] = (0.45, 0.85), rotation: str = "so3", seed: int = 0,
                 cache_dir: str | None = None) -> None:
        _check_split(split, "shapes")
        self.split = split
        self.size = int_arg("size", size if size is not None else (4000 if split == "train" else 1000), 1)
        self.points, self.seed = int_arg("points", points, 1), int_arg("seed", seed, 0)
        self.noise, self.partial = float_arg("noise", noise), float_arg("partial", partial)
        self.scale, self.anisotropy, self.keep = range_arg("scale", scale), range_arg("anisotropy", anisotropy), range_arg("keep", keep)
        if self.noise < 0 or not 0 <= self.partial <= 1 or not 0 < self.keep[0] <= self.keep[1] <= 1 or min(self.scale + self.anisotropy) <= 0:
            raise DataError("shapes need noise >= 0, partial in [0, 1], keep within (0, 1], positive scale and anisotropy")
        if rotation not in ("so3", "z"):
            raise DataError(f"rotation must be 'so3' (any rotation) or 'z' (about the up axis), got {rotation!r}")
        self.rotation = rotation
        meta = {"kind": "shapes", "format_version": FORMAT_VERSION, "split": split, "size": self.size,
                "points": self.points, "noise": self.noise, "scale": self.scale, "anisotropy": self.anisotropy,
                "partial": self.partial, "keep": self.keep, "rotation": rotation, "seed": self.seed}
        name = f"shapes_v{FORMAT_VERSION}_{split}_n{self.size}_p{self.points}_seed{self.seed}_{hashlib.sha1(json.dumps(meta).encode()).hexdigest()[:8]}.npz"
        self.cache_path = os.path.join(os.fspath(cache_dir) if cache_dir is not None else lidar_cache_dir(), name)
        arrays = cached_arrays(self.cache_path, meta, self._generate)
        self._points, self.labels = arrays["points"], arrays["labels"]
        self.skipped: list[tuple[str, str]] = []  # generated: a damaged cache is made again, never skipped

    def _generate(self) -> dict[str, np.ndarray]:
        rng = _split_rng(self.seed, self.split)
        labels = rng.permutation(np.arange(self.size) % self.num_classes).astype(np.int64)
        samplers = list(_SHAPES.values())
        candidates = math.ceil(self.points / self.keep[0] * 1.05) + 8  # enough left after any cut
        out = np.empty((self.size, self.points, 3), dtype=np.float32)
        for i, label in enumerate(labels):
            p = samplers[label](rng, candidates)
            p = p * (rng.uniform(*self.scale) * rng.uniform(*self.anisotropy, 3))
            p = p @ _random_rotation(rng, self.rotation == "z").T
            if rng.uniform() < self.partial:
                depth = p @ _sphere(rng, 1)[0]
                p = p[depth <= np.quantile(depth, rng.uniform(*self.keep))]
            p = p[rng.choice(len(p), self.points, replace=False)] + rng.normal(0.0, self.noise, (self.points, 3))
            out[i] = p - p.mean(axis=0)
        return {"points": out, "labels": labels}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index])
        return {"points": torch.from_numpy(self._points[index].copy()), "label": label,
                "text": _article(SHAPE_CLASSES[label])}


# --------------------------------------------------------------------------------------------
# lidar: ray casting, vectorized over rays (one Python step per object)


def _box_hits(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Distance along each ray to a box ``(cx, cy, cz, lx, ly, lz, yaw)`` (yaw about z); inf if missed."""
    c, s = math.cos(box[6]), math.sin(box[6])
    rel = origin - box[:3]
    o = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])  # into the box's frame
    d = np.stack([c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2]], axis=1)
    d = np.where(np.abs(d) < 1e-12, 1e-12, d)
    half = box[3:6] / 2.0
    t1, t2 = (-half - o) / d, (half - o) / d
    near, far = np.minimum(t1, t2).max(axis=1), np.maximum(t1, t2).min(axis=1)
    return np.where((near <= far) & (near > 0.0), near, np.inf)


def _cylinder_hits(origin: np.ndarray, dirs: np.ndarray, cyl: np.ndarray) -> np.ndarray:
    """Distance to a vertical cylinder ``(cx, cy, radius, z_bottom, z_top)`` (side or top); inf if missed."""
    ox, oy, oz = origin[0] - cyl[0], origin[1] - cyl[1], origin[2]
    a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
    b = 2.0 * (ox * dirs[:, 0] + oy * dirs[:, 1])
    disc = b * b - 4.0 * a * (ox * ox + oy * oy - cyl[2] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        side = (-b - np.sqrt(disc)) / (2.0 * a)
        side_z = oz + side * dirs[:, 2]
        side = np.where((disc >= 0) & (side > 0) & (side_z >= cyl[3]) & (side_z <= cyl[4]), side, np.inf)
        top = (cyl[4] - oz) / dirs[:, 2]
    inside = (ox + top * dirs[:, 0]) ** 2 + (oy + top * dirs[:, 1]) ** 2 <= cyl[2] ** 2
    top = np.where((dirs[:, 2] < 0) & (top > 0) & inside, top, np.inf)
    return np.minimum(side, top)


def raycast(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray, cylinders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First hit of every ray: ``(distance [R], surface [R])``; surface 0 is the ground (z = 0),
    ``1 + i`` box ``i``, ``1 + len(boxes) + j`` cylinder ``j``; distance inf where nothing is hit.

    Each object is tested only against the rays that pass through its bounding sphere.
    """
    with np.errstate(divide="ignore"):
        best = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
    surface = np.zeros(len(dirs), dtype=np.int64)
    objects = ([(b, _box_hits, b[:3], 0.5 * np.linalg.norm(b[3:6])) for b in boxes]
               + [(c, _cylinder_hits, np.array([c[0], c[1], (c[3] + c[4]) / 2]), math.hypot(c[2], (c[4] - c[3]) / 2))
                  for c in cylinders])
    for k, (params, hits, centre, radius) in enumerate(objects, start=1):
        rel = centre - origin
        along = dirs @ rel
        near = np.flatnonzero((along > -radius) & (rel @ rel - along ** 2 <= radius ** 2))
        t = hits(origin, dirs[near], params)
        closer = t < best[near]
        best[near[closer]], surface[near[closer]] = t[closer], k
    return best, surface


SCENE_TYPES = ("street", "parking lot", "park", "highway")


def _boxes_along(rng, count, x_range, y_abs, size_low, size_high, yaw_jitter, yaw=0.0):
    """``count`` boxes on random sides, ``(cx, cy, cz, lx, ly, lz, yaw)``, standing on the ground."""
    size = rng.uniform(size_low, size_high, (count, 3))
    side = rng.choice([-1.0, 1.0], count)
    y = side * (rng.uniform(*y_abs, count) + size[:, 1] / 2)
    return np.column_stack([rng.uniform(*x_range, count), y, size[:, 2] / 2, size,
                            yaw + rng.normal(0.0, yaw_jitter, count)])


def _posts(rng, count, x_range, y_abs, radius, height):
    return np.column_stack([rng.uniform(*x_range, count), rng.choice([-1.0, 1.0], count) * rng.uniform(*y_abs, count),
                            rng.uniform(*radius, count), np.zeros(count), rng.uniform(*height, count)])


def _scene(rng: np.random.Generator, kind: int) -> dict[str, np.ndarray]:
    """A scene layout around a road along x (nothing within 2.5 m of y = 0, where the sensor drives)."""
    xs = (-45.0, 65.0)
    car_low, car_high = (4.0, 1.7, 1.4), (4.9, 2.0, 1.7)
    buildings = cars = rails = np.zeros((0, 7))
    poles = trees = np.zeros((0, 5))
    if kind == 0:  # street: facades on both sides, parked cars, street lights, a few trees
        buildings = _boxes_along(rng, rng.integers(4, 11), xs, (7.0, 10.0), (8.0, 8.0, 5.0), (25.0, 15.0, 25.0), 0.02)
        cars = _boxes_along(rng, rng.integers(0, 9), xs, (2.6, 3.2), car_low, car_high, 0.05)
        poles = _posts(rng, rng.integers(2, 9), xs, (5.5, 6.5), (0.08, 0.15), (5.0, 8.0))
        trees = _posts(rng, rng.integers(0, 5), xs, (5.0, 6.0), (0.2, 0.4), (3.0, 6.0))
    elif kind == 1:  # parking lot: rows of cars across the road, a few lights, far buildings
        rows = np.array([5.0, 11.0, 17.0])
        slots = np.array([(x, s * y) for x in np.arange(-40.0, 60.0, 2.7) for y in rows for s in (-1.0, 1.0)])
        taken = slots[rng.uniform(size=len(slots)) < rng.uniform(0.15, 0.5)]
        cars = np.column_stack([taken, np.zeros(len(taken)), rng.uniform(car_low, car_high, (len(taken), 3)),
                                np.pi / 2 + rng.normal(0.0, 0.08, len(taken))])
        cars[:, 2] = cars[:, 5] / 2
        poles = _posts(rng, rng.integers(1, 5), xs, (3.0, 20.0), (0.1, 0.2), (6.0, 10.0))
        buildings = _boxes_along(rng, rng.integers(0, 3), xs, (30.0, 40.0), (15.0, 10.0, 5.0), (40.0, 20.0, 15.0), 0.1)
    elif kind == 2:  # park: many trunks, a few lamps, some benches
        trees = _posts(rng, rng.integers(10, 41), xs, (3.0, 40.0), (0.15, 0.6), (3.0, 12.0))
        poles = _posts(rng, rng.integers(0, 4), xs, (3.0, 10.0), (0.06, 0.12), (3.0, 5.0))
        buildings = _boxes_along(rng, rng.integers(0, 4), xs, (4.0, 15.0), (1.5, 0.4, 0.4), (2.0, 0.7, 0.9), 0.5)
    else:  # highway: guard rails, cars in the other lanes, sign posts
        rails = np.array([[10.0, s * 5.5, 0.55, 120.0, 0.3, 0.5, 0.0] for s in (-1.0, 1.0)])
        cars = _boxes_along(rng, rng.integers(0, 6), xs, (2.6, 3.2), car_low, car_high, 0.02)
        poles = _posts(rng, rng.integers(2, 7), xs, (7.0, 9.0), (0.1, 0.2), (4.0, 7.0))
    boxes = np.concatenate([cars, buildings, rails])
    cylinders = np.concatenate([poles, trees])
    reflect = np.concatenate([rng.uniform(0.5, 0.9, len(cars)), rng.uniform(0.15, 0.4, len(buildings) + len(rails)),
                              rng.uniform(0.3, 0.6, len(poles)), rng.uniform(0.05, 0.2, len(trees))])
    ground = rng.uniform(0.25, 0.4) if kind == 2 else rng.uniform(0.05, 0.15)
    return {"boxes": boxes, "cylinders": cylinders, "reflect": np.r_[ground, reflect],
            "counts": np.array([len(cars), len(buildings), len(poles), len(trees)]),
            "speed": np.array([rng.uniform(3.0, 15.0)])}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _caption(kind: int, counts: np.ndarray) -> str:
    words = ("car", "bench" if kind == 2 else "building", "pole", "tree")
    parts = [_plural(int(n), w).replace("benchs", "benches") for n, w in zip(counts, words) if n]
    things = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "")
    return f"a {SCENE_TYPES[kind]}" + (f" with {things}" if things else "")


class LidarSweepsDataset(Dataset):
    """Simulated spinning-lidar sweeps of generated street scenes; label = scene type.

    Each sample is one scene seen from a sensor driving along x (``speed`` m/s, sweeps every
    ``dt`` s). The sensor is at the origin of the current sweep's frame, ``sensor_height`` above
    the ground (ground points have z = -sensor_height). With ``sweeps`` k > 1 the previous k - 1
    sweeps are moved into the current frame and appended with a time channel (0, -dt, ...).
    Range noise ``range_noise`` (m, along the ray), per-surface reflectivity plus noise as
    intensity in [0, 1], and a ``dropout`` share of rays lost.

    Args:
        split: ``"train"`` or ``"test"``.
        size: Scenes (default 1000 for train, 200 for test).
        sweeps: Sweeps per sample.
        beams, elevation, azimuth_steps: Laser geometry (default 32 beams from -30 to +10 degrees,
            1024 steps per turn: about 25k points).
        points: If given, a KITTI-like 64-beam sensor (-24.9 to +2 degrees) with enough azimuth steps
            for about this many returns (e.g. 120000).
        max_range, sensor_height, dt, range_noise, dropout: As above.
        seed, cache_dir: As in :class:`ShapesDataset`.
    """

    classes = SCENE_TYPES
    num_classes = len(SCENE_TYPES)

    def __init__(self, split: str, size: int | None = None, sweeps: int = 1, beams: int = 32,
                 elevation: Sequence[float] = (-30.0, 10.0), azimuth_steps: int = 1024, points: int | None = None,
                 max_range: float = 70.0, sensor_height: float = 1.8, dt: float = 0.1, range_noise: float = 0.02,
                 dropout: float = 0.02, seed: int = 0, cache_dir: str | None = None) -> None:
        _check_split(split, "lidar sweeps")
        self.split, self.seed = split, int_arg("seed", seed, 0)
        self.size = int_arg("size", size if size is not None else (1000 if split == "train" else 200), 1)
        self.sweeps = int_arg("sweeps", sweeps, 1)
        self.max_range, self.sensor_height, self.dt = (float_arg(n, v) for n, v in
                                                       (("max_range", max_range), ("sensor_height", sensor_height), ("dt", dt)))
        self.range_noise, self.dropout = float_arg("range_noise", range_noise), float_arg("dropout", dropout)
        if min(self.max_range, self.sensor_height, self.dt) <= 0 or self.range_noise < 0 or not 0 <= self.dropout < 1:
            raise DataError("lidar sweeps need positive max_range, sensor_height and dt, range_noise >= 0, dropout in [0, 1)")
        if points is not None:
            beams, elevation = 64, (-24.9, 2.0)
        self.beams, self.elevation = int_arg("beams", beams, 1), range_arg("elevation", elevation)
        angles = np.radians(np.linspace(*self.elevation, self.beams))
        if points is not None:  # beams that reach the ground within range return on (almost) every step
            ground_beams = max(1, int((angles < -math.atan2(self.sensor_height, self.max_range)).sum()))
            azimuth_steps = math.ceil(int_arg("points", points, 1) / ground_beams)
        self.azimuth_steps = int_arg("azimuth_steps", azimuth_steps, 1)
        azimuth = 2 * np.pi * np.arange(self.azimuth_steps) / self.azimuth_steps
        el, az = np.meshgrid(angles, azimuth, indexing="ij")
        self.directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)

        meta = {"kind": "lidar_scenes", "format_version": FORMAT_VERSION, "split": split, "size": self.size, "seed": self.seed}
        name = f"lidar_scenes_v{FORMAT_VERSION}_{split}_n{self.size}_seed{self.seed}.npz"
        self.cache_path = os.path.join(os.fspath(cache_dir) if cache_dir is not None else lidar_cache_dir(), name)
        arrays = cached_arrays(self.cache_path, meta, self._generate)
        self.labels, self.counts, self.speeds = arrays["labels"], arrays["counts"], arrays["speeds"]
        self.skipped: list[tuple[str, str]] = []  # generated: a damaged cache is made again, never skipped
        self._boxes = np.split(arrays["boxes"], np.cumsum(arrays["num_boxes"])[:-1])
        self._cylinders = np.split(arrays["cylinders"], np.cumsum(arrays["num_cylinders"])[:-1])
        self._reflect = np.split(arrays["reflect"], np.cumsum(arrays["num_boxes"] + arrays["num_cylinders"] + 1)[:-1])

    def _generate(self) -> dict[str, np.ndarray]:
        rng = _split_rng(self.seed, self.split)
        labels = rng.permutation(np.arange(self.size) % self.num_classes).astype(np.int64)
        scenes = [_scene(rng, int(k)) for k in labels]
        return {"labels": labels, "counts": np.stack([s["counts"] for s in scenes]).astype(np.int64),
                "speeds": np.concatenate([s["speed"] for s in scenes]),
                "boxes": np.concatenate([s["boxes"] for s in scenes]).reshape(-1, 7),
                "cylinders": np.concatenate([s["cylinders"] for s in scenes]).reshape(-1, 5),
                "reflect": np.concatenate([s["reflect"] for s in scenes]),
                "num_boxes": np.array([len(s["boxes"]) for s in scenes]),
                "num_cylinders": np.array([len(s["cylinders"]) for s in scenes])}

    def scene(self, index: int) -> dict[str, np.ndarray]:
        """Scene ``index`` in world coordinates (ground z = 0): ``boxes`` ``[B, 7]`` (centre, size,
        yaw), ``cylinders`` ``[C, 5]`` (x, y, radius, z bottom, z top), ``reflect`` (ground first)."""
        return {"boxes": self._boxes[index], "cylinders": self._cylinders[index], "reflect": self._reflect[index]}

    def sensor_position(self, index: int, back: int = 0) -> np.ndarray:
        """World position of the sensor ``back`` sweeps before the current one (which is at x = 0)."""
        return np.array([-back * self.dt * self.speeds[index], 0.0, self.sensor_height])

    def sweep(self, index: int, back: int = 0) -> np.ndarray:
        """One sweep ``[N, 4]`` (x, y, z, intensity) in the frame of the sensor that took it."""
        rng = np.random.default_rng([self.seed, _SPLITS.index(self.split), FORMAT_VERSION, index, back])
        origin = self.sensor_position(index, back)
        scene = self.scene(index)
        distance, surface = raycast(origin, self.directions, scene["boxes"], scene["cylinders"])
        hit = (distance <= self.max_range) & (rng.uniform(size=len(distance)) >= self.dropout)
        distance = distance[hit] + rng.normal(0.0, self.range_noise, int(hit.sum()))
        intensity = np.clip(scene["reflect"][surface[hit]] + rng.normal(0.0, 0.03, len(distance)), 0.0, 1.0)
        return np.column_stack([self.directions[hit] * distance[:, None], intensity]).astype(np.float32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.sweeps == 1:
            points = self.sweep(index)
        else:
            poses = [np.eye(4) for _ in range(self.sweeps)]
            for back, pose in enumerate(poses):
                pose[:3, 3] = self.sensor_position(index, back)
            points = concat_sweeps([self.sweep(index, b) for b in range(self.sweeps)],
                                   [-b * self.dt for b in range(self.sweeps)], poses)
        label = int(self.labels[index])
        return {"points": torch.from_numpy(points), "label": label, "text": _caption(label, self.counts[index])}
