"""Generated streets seen by a front camera and a roof lidar at once: one world per street, ray cast
for both sensors, so every pixel and every point comes from the same geometry.

A world is a pure function of (seed, split, street): a road along x, sidewalks, and objects of
seven classes standing on the ground (boxes: buildings, cars, guard rails; vertical cylinders:
poles, tree trunks and crowns, pedestrians). The ego drives along the road. The camera image is
ray cast per pixel and shaded by surface class, a sun (Lambert) and distance haze; the lidar is a
spinning 32-beam sensor whose returns carry the class of the surface they hit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..lidar.scenes import raycast

__all__ = ["CLASSES", "STREET_KINDS", "World", "make_world", "camera_rays", "render", "lidar_returns", "hit_normals",
           "beam_directions", "object_velocities", "radar_returns", "radar_directions"]

CLASSES = ("road", "sidewalk", "building", "car", "guard_rail", "pole", "tree", "pedestrian")
STREET_KINDS = ("city street", "highway", "park road")
# base colours (RGB in [0, 1]) the camera shades; the lidar sees reflectivity instead
COLOURS = np.array([[0.32, 0.32, 0.34], [0.62, 0.60, 0.55], [0.70, 0.52, 0.40], [0.15, 0.30, 0.75],
                    [0.80, 0.80, 0.82], [0.90, 0.75, 0.15], [0.20, 0.55, 0.20], [0.85, 0.25, 0.30]])
REFLECTIVITY = np.array([0.10, 0.25, 0.30, 0.70, 0.85, 0.50, 0.15, 0.40])
# radar cross-section (dBsm) the radar reports per class: metal strong, people and foliage weak
RCS = np.array([-20.0, -15.0, 20.0, 10.0, 5.0, 0.0, -5.0, -8.0])
SKY_TOP, SKY_HORIZON = np.array([0.35, 0.55, 0.90]), np.array([0.80, 0.87, 0.95])
SUN = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])
ROAD_HALF_WIDTH, SIDEWALK = 5.0, 3.0
_SPLITS = ("train", "test")


@dataclass
class World:
    """One street in world coordinates (ground at z = 0).

    Attributes:
        kind: index into `STREET_KINDS`.
        boxes: ``[nb, 7]`` ``(cx, cy, cz, lx, ly, lz, yaw)``; box_class ``[nb]``.
        cylinders: ``[nc, 5]`` ``(x, y, radius, z_bottom, z_top)``; cylinder_class ``[nc]``.
    """

    kind: int
    boxes: np.ndarray
    box_class: np.ndarray
    cylinders: np.ndarray
    cylinder_class: np.ndarray

    def surface_class(self, surface: np.ndarray, hit: np.ndarray) -> np.ndarray:
        """The class of each ray's surface (`raycast` numbering); the ground is road or sidewalk by y."""
        objects = np.concatenate([[-1], self.box_class, self.cylinder_class]).astype(np.int64)
        ground = np.where(np.abs(hit[:, 1]) < ROAD_HALF_WIDTH, CLASSES.index("road"), CLASSES.index("sidewalk"))
        return np.where(surface == 0, ground, objects[surface])


def _side(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], n)


def make_world(seed: int, split: str, street: int, length: float = 160.0) -> World:
    """Street ``street`` of ``split``: its own random stream, so train and test streets never repeat.
    Its kind (`STREET_KINDS`) is ``street`` modulo their number."""
    rng = np.random.default_rng([seed, _SPLITS.index(split), street, 7])
    kind = street % len(STREET_KINDS)  # kinds in turn: every split holds each about equally
    boxes, box_class, cyl, cyl_class = [], [], [], []

    def add_boxes(xs, ys, size, yaw, cls):
        for x, y, (lx, ly, lz), a in zip(xs, ys, size, yaw):
            boxes.append([x, y, lz / 2, lx, ly, lz, a])
            box_class.append(CLASSES.index(cls))

    def add_cylinders(xs, ys, radius, z0, z1, cls):
        for row in zip(xs, ys, radius, z0, z1):
            cyl.append(list(row))
            cyl_class.append(CLASSES.index(cls))

    curb = ROAD_HALF_WIDTH + SIDEWALK
    n_cars = int(rng.integers(3, 10))
    parked = rng.uniform(size=n_cars) < (0.7 if kind == 0 else 0.2)
    car_y = np.where(parked, ROAD_HALF_WIDTH - 1.2, rng.choice([1.8, 3.2], n_cars)) * _side(rng, n_cars)
    add_boxes(rng.uniform(5, length, n_cars), car_y, rng.uniform([3.9, 1.7, 1.4], [4.8, 2.0, 1.7], (n_cars, 3)),
              rng.normal(0, 0.05, n_cars), "car")
    n_poles = int(rng.integers(2, 8))
    add_cylinders(rng.uniform(0, length, n_poles), _side(rng, n_poles) * (ROAD_HALF_WIDTH + 0.6),
                  rng.uniform(0.1, 0.18, n_poles), np.zeros(n_poles), rng.uniform(4.5, 8.0, n_poles), "pole")
    n_people = int(rng.integers(0, 8 if kind != 1 else 1))
    add_cylinders(rng.uniform(3, length, n_people), _side(rng, n_people) * rng.uniform(ROAD_HALF_WIDTH + 1, curb - 0.3, n_people),
                  rng.uniform(0.22, 0.3, n_people), np.zeros(n_people), rng.uniform(1.55, 1.9, n_people), "pedestrian")
    if kind == 0:  # city street: facades on both sides
        for side in (-1.0, 1.0):
            x = -10.0
            while x < length:
                lx, ly, lz = rng.uniform(8, 22), rng.uniform(8, 14), rng.uniform(6, 24)
                add_boxes([x + lx / 2], [side * (curb + 0.5 + ly / 2)], [(lx, ly, lz)], [0.0], "building")
                x += lx + rng.uniform(0, 4)
    n_trees = int(rng.integers(10, 30)) if kind == 2 else int(rng.integers(0, 5))
    tx, ty = rng.uniform(0, length, n_trees), _side(rng, n_trees) * rng.uniform(curb + 0.5, curb + 12, n_trees)
    trunk = rng.uniform(2.0, 3.5, n_trees)
    add_cylinders(tx, ty, rng.uniform(0.15, 0.35, n_trees), np.zeros(n_trees), trunk, "tree")
    add_cylinders(tx, ty, rng.uniform(1.2, 2.6, n_trees), trunk, trunk + rng.uniform(2.0, 4.5, n_trees), "tree")
    if kind == 1:  # highway: a guard rail along each road edge
        for side in (-1.0, 1.0):
            add_boxes([length / 2], [side * (ROAD_HALF_WIDTH + 0.3)], [(length + 40, 0.25, 0.8)], [0.0], "guard_rail")
    return World(kind, np.asarray(boxes, float).reshape(-1, 7), np.asarray(box_class, np.int64),
                 np.asarray(cyl, float).reshape(-1, 5), np.asarray(cyl_class, np.int64))


def hit_normals(world: World, surface: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """The outward surface normal ``[R, 3]`` at each hit point (ground: up)."""
    normal = np.tile([0.0, 0.0, 1.0], (len(surface), 1))
    nb = len(world.boxes)
    on_box = (surface >= 1) & (surface <= nb)
    if on_box.any():
        box = world.boxes[surface[on_box] - 1]
        c, s = np.cos(box[:, 6]), np.sin(box[:, 6])
        rel = hit[on_box] - box[:, :3]
        local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1) / (box[:, 3:6] / 2)
        axis = np.abs(local).argmax(1)  # the face hit is where the point is furthest out, in half extents
        n_local = np.zeros_like(local)
        n_local[np.arange(len(axis)), axis] = np.sign(local[np.arange(len(axis)), axis])
        normal[on_box] = np.stack([c * n_local[:, 0] - s * n_local[:, 1], s * n_local[:, 0] + c * n_local[:, 1],
                                   n_local[:, 2]], 1)
    on_cyl = surface > nb
    if on_cyl.any():
        cyl = world.cylinders[surface[on_cyl] - 1 - nb]
        side = np.column_stack([hit[on_cyl, :2] - cyl[:, :2], np.zeros(int(on_cyl.sum()))]) / cyl[:, 2:3]
        top = hit[on_cyl, 2] >= cyl[:, 4] - 1e-6
        normal[on_cyl] = np.where(top[:, None], [0.0, 0.0, 1.0], side)
    return normal


def camera_rays(intrinsics: np.ndarray, cam_to_world: np.ndarray, height: int, width: int) -> np.ndarray:
    """World-frame unit directions ``[H * W, 3]`` through each pixel's centre (row-major)."""
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], 1)
    cam = pixels @ np.linalg.inv(intrinsics).T
    world = cam @ cam_to_world[:3, :3].T
    return world / np.linalg.norm(world, axis=1, keepdims=True)


def render(world: World, intrinsics: np.ndarray, cam_to_world: np.ndarray, height: int, width: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The camera's image ``[3, H, W]`` float32 in [0, 1] and its class map ``[H, W]`` (-1: sky)."""
    origin = cam_to_world[:3, 3]
    dirs = camera_rays(intrinsics, cam_to_world, height, width)
    distance, surface = raycast(origin, dirs, world.boxes, world.cylinders)
    seen = np.isfinite(distance) & (distance < 250.0)
    hit = origin + dirs * np.where(seen, distance, 0.0)[:, None]
    cls = np.where(seen, world.surface_class(surface, hit), -1)
    normal = hit_normals(world, surface, hit)
    light = 0.35 + 0.65 * np.clip(normal @ SUN, 0.0, 1.0)
    colour = COLOURS[np.maximum(cls, 0)] * light[:, None]
    haze = 1.0 - np.exp(-np.where(seen, distance, 0.0) / 120.0)
    sky = SKY_HORIZON + (SKY_TOP - SKY_HORIZON) * np.clip(dirs[:, 2:3] * 3.0, 0.0, 1.0)
    colour = np.where(seen[:, None], colour * (1 - haze[:, None]) + SKY_HORIZON * haze[:, None], sky)
    colour = np.clip(colour + rng.normal(0.0, 0.01, colour.shape), 0.0, 1.0)
    return colour.T.reshape(3, height, width).astype(np.float32), cls.reshape(height, width)


def lidar_returns(world: World, lidar_to_world: np.ndarray, directions: np.ndarray, max_range: float,
                  rng: np.random.Generator, range_noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Points ``[N, 4]`` (x, y, z, intensity) in the lidar's frame and their classes ``[N]``, for
    unit ``directions [R, 3]`` in that frame; rays that hit nothing within ``max_range`` are dropped."""
    rotation, origin = lidar_to_world[:3, :3], lidar_to_world[:3, 3]
    distance, surface = raycast(origin, directions @ rotation.T, world.boxes, world.cylinders)
    kept = distance <= max_range
    distance, surface, local = distance[kept], surface[kept], directions[kept]
    cls = world.surface_class(surface, origin + (local @ rotation.T) * distance[:, None])
    distance = distance + rng.normal(0.0, range_noise, len(distance))
    intensity = np.clip(REFLECTIVITY[cls] + rng.normal(0.0, 0.03, len(cls)), 0.0, 1.0)
    return np.column_stack([local * distance[:, None], intensity]).astype(np.float32), cls


def object_velocities(world: World) -> np.ndarray:
    """Each surface's velocity in the world ``[1 + nb + nc, 3]`` (`raycast` numbering, the ground
    first): cars in a lane drive along it (12 m/s in the inner lane, 8 m/s in the outer, each side
    its own direction), pedestrians walk along the sidewalk at 1.4 m/s; parked cars and the rest
    stand still. Derived from the geometry, so it draws nothing from the world's random stream."""
    car, pedestrian = CLASSES.index("car"), CLASSES.index("pedestrian")
    y = world.boxes[:, 1]
    moving = (world.box_class == car) & (np.abs(y) < ROAD_HALF_WIDTH - 1.5)
    box_speed = np.where(moving, np.where(np.abs(y) < 2.5, 12.0, 8.0), 0.0) * -np.sign(y)
    walker = world.cylinder_class == pedestrian
    cyl_speed = np.where(walker, 1.4, 0.0) * np.sign(world.cylinders[:, 1])
    speed = np.concatenate([[0.0], box_speed, cyl_speed])
    return np.column_stack([speed, np.zeros_like(speed), np.zeros_like(speed)])


def radar_returns(world: World, radar_to_world: np.ndarray, ego_velocity: np.ndarray, directions: np.ndarray,
                  max_range: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 4-D imaging radar's detections ``[M, 5]`` (x, y, z, Doppler m/s, RCS dBsm) in its frame and
    their classes ``[M]``: rays ``directions [R, 3]`` (its frame) that hit an object within
    ``max_range`` (ground returns are filtered out, as radars do). Doppler is the radial velocity of
    the surface relative to the moving radar (positive: receding); positions are coarser than the
    lidar's (0.15 m in range, 0.5 degrees in azimuth)."""
    rotation, origin = radar_to_world[:3, :3], radar_to_world[:3, 3]
    world_dirs = directions @ rotation.T
    distance, surface = raycast(origin, world_dirs, world.boxes, world.cylinders)
    kept = (distance <= max_range) & (surface > 0)
    distance, surface, local, world_dirs = distance[kept], surface[kept], directions[kept], world_dirs[kept]
    cls = world.surface_class(surface, origin + world_dirs * distance[:, None])
    doppler = ((object_velocities(world)[surface] - ego_velocity) * world_dirs).sum(1)
    yaw = rng.normal(0.0, math.radians(0.5), len(cls))
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.column_stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]])
    distance = distance + rng.normal(0.0, 0.15, len(cls))
    columns = [local * distance[:, None], doppler + rng.normal(0.0, 0.1, len(cls)), RCS[cls] + rng.normal(0.0, 2.0, len(cls))]
    return np.column_stack(columns).astype(np.float32), cls


def radar_directions(azimuth: float = 60.0, azimuth_step: float = 1.0, elevation: tuple[float, ...] = (-4.0, -1.0, 2.0, 5.0)) -> np.ndarray:
    """Unit directions of a forward radar: ``+-azimuth`` degrees in ``azimuth_step`` steps, at each ``elevation``."""
    el, az = np.meshgrid(np.radians(elevation), np.radians(np.arange(-azimuth, azimuth + azimuth_step / 2, azimuth_step)),
                         indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)


def beam_directions(beams: int, azimuth_steps: int, elevation: tuple[float, float] = (-25.0, 10.0)) -> np.ndarray:
    """Unit directions ``[beams * azimuth_steps, 3]`` of a spinning lidar."""
    el, az = np.meshgrid(np.radians(np.linspace(*elevation, beams)), 2 * math.pi * np.arange(azimuth_steps) / azimuth_steps,
                         indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
