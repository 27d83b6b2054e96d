"""Point-cloud data: readers on files written here, the folder dataset, transforms, multi-sweep
concatenation, generated shapes and simulated sweeps, and the real aerial tile when fetched."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from anymodal.core.data import AugmentedDataset, collate
from anymodal.plugins.lidar import transforms as T
from anymodal.core.errors import CorruptFileError
from anymodal.plugins.lidar.data import (AERIAL_TILE_POINTS, AerialTileDataset, PointFolderDataset,
                                                 aerial_tile_path, concat_sweeps, read_bin, read_las, read_npy,
                                                 read_pcd, read_points)
from anymodal.plugins.lidar.scenes import SHAPE_CLASSES, LidarSweepsDataset, ShapesDataset

HAVE_LASPY = importlib.util.find_spec("laspy") is not None


def _cloud(n: int = 200, channels: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, channels)) * [10, 10, 2, 1][:channels] + [0, 0, 0, 2][:channels]).astype(np.float32)


def _write_pcd(path, fields, sizes, types, counts, rows: np.ndarray, kind: str) -> None:
    """A PCD file: ``rows`` is a structured array (binary) or a 2-D float array (ascii)."""
    header = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\n"
              f"TYPE {' '.join(types)}\nCOUNT {' '.join(map(str, counts))}\nWIDTH {len(rows)}\nHEIGHT 1\n"
              f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(rows)}\nDATA {kind}\n")
    with open(path, "wb") as fh:
        fh.write(header.encode())
        if kind == "ascii":
            fh.write("\n".join(" ".join(repr(float(v)) for v in row) for row in rows).encode() + b"\n")
        else:
            fh.write(rows.tobytes())


# --------------------------------------------------------------------------------------------
# readers


def test_bin_reads_back_and_rejects_a_wrong_byte_count(tmp_path):
    cloud = _cloud()
    cloud.tofile(tmp_path / "a.bin")
    np.testing.assert_array_equal(read_bin(str(tmp_path / "a.bin")), cloud)
    np.testing.assert_array_equal(read_points(str(tmp_path / "a.bin")), cloud)
    bad = tmp_path / "cut.bin"
    bad.write_bytes(cloud.tobytes()[:-8])
    with pytest.raises(CorruptFileError, match=r"cut\.bin.*3192 bytes is not a multiple of 16"):
        read_bin(str(bad))


@pytest.mark.parametrize("what, array, match", [
    ("empty", np.zeros((0, 4), np.float32), "empty point cloud"),
    ("nan", np.where(np.arange(40).reshape(10, 4) == 5, np.nan, 1.0), "1 of 10 points have NaN or infinite coordinates"),
    ("inf", np.where(np.arange(40).reshape(10, 4) == 3, np.inf, 1.0), "1 of 10 points have NaN or infinite attribute"),
    ("flat", np.ones((10, 2)), r"expected a point array \[N, >=3\]"),
])
def test_malformed_clouds_name_the_file_and_the_fault(tmp_path, what, array, match):
    path = tmp_path / f"{what}.npy"
    np.save(path, array)
    with pytest.raises(CorruptFileError, match=match) as info:
        read_npy(str(path))
    assert info.value.path == str(path)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        read_bin(str(tmp_path / "empty.bin"))


def test_npy_and_npz(tmp_path):
    cloud = _cloud(channels=3)
    np.save(tmp_path / "a.npy", cloud.astype(np.float64))
    out = read_points(str(tmp_path / "a.npy"))
    assert out.dtype == np.float32 and np.allclose(out, cloud)
    np.savez(tmp_path / "b.npz", first=cloud, second=cloud * 2)
    assert np.allclose(read_npy(str(tmp_path / "b.npz")), cloud)
    assert np.allclose(read_points(str(tmp_path / "b.npz"), key="second"), cloud * 2)
    with pytest.raises(CorruptFileError, match="no array 'third'"):
        read_npy(str(tmp_path / "b.npz"), key="third")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError, match="junk.npz"):
        read_npy(str(tmp_path / "junk.npz"))


def test_pcd_ascii_and_binary_with_mixed_fields(tmp_path):
    cloud = _cloud(50)
    # ascii: intensity first, a 3-value normal in between
    rows = np.column_stack([cloud[:, 3], cloud[:, :3], np.ones((50, 3))])
    _write_pcd(tmp_path / "a.pcd", ["intensity", "x", "y", "z", "normal"], [4, 4, 4, 4, 4], ["F"] * 5,
               [1, 1, 1, 1, 3], rows, "ascii")
    np.testing.assert_allclose(read_pcd(str(tmp_path / "a.pcd")), cloud, rtol=1e-6)
    # binary: float64 coordinates, uint8 rgb counted 3 times, uint16 intensity, int32 ring
    record = np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("rgb", "u1", (3,)), ("intensity", "<u2"), ("ring", "<i4")])
    data = np.zeros(50, record)
    data["x"], data["y"], data["z"] = cloud[:, 0], cloud[:, 1], cloud[:, 2]
    data["intensity"], data["ring"] = np.arange(50) * 7, -np.arange(50)
    _write_pcd(tmp_path / "b.pcd", ["x", "y", "z", "rgb", "intensity", "ring"], [8, 8, 8, 1, 2, 4],
               ["F", "F", "F", "U", "U", "I"], [1, 1, 1, 3, 1, 1], data, "binary")
    out = read_points(str(tmp_path / "b.pcd"))
    np.testing.assert_allclose(out[:, :3], cloud[:, :3], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 3], np.arange(50) * 7)
    # without intensity: x, y, z only
    _write_pcd(tmp_path / "c.pcd", ["x", "y", "z"], [4] * 3, ["F"] * 3, [1] * 3, cloud[:, :3], "ascii")
    assert read_pcd(str(tmp_path / "c.pcd")).shape == (50, 3)


def test_pcd_faults(tmp_path):
    cloud = _cloud(20)
    record = np.dtype([(f, "<f4") for f in "xyz"])
    data = np.zeros(20, record)
    for i, f in enumerate("xyz"):
        data[f] = cloud[:, i]
    _write_pcd(tmp_path / "cut.pcd", list("xyz"), [4] * 3, ["F"] * 3, [1] * 3, data[:15], "binary")
    text = (tmp_path / "cut.pcd").read_bytes().replace(b"POINTS 15", b"POINTS 20")
    (tmp_path / "cut.pcd").write_bytes(text)
    with pytest.raises(CorruptFileError, match=r"cut\.pcd.*180 bytes, 20 points of 12 bytes need 240"):
        read_pcd(str(tmp_path / "cut.pcd"))
    _write_pcd(tmp_path / "z.pcd", list("xyz"), [4] * 3, ["F"] * 3, [1] * 3, data, "binary_compressed")
    with pytest.raises(CorruptFileError, match="binary_compressed.*not supported"):
        read_pcd(str(tmp_path / "z.pcd"))
    _write_pcd(tmp_path / "noz.pcd", list("xy"), [4] * 2, ["F"] * 2, [1] * 2, cloud[:, :2], "ascii")
    with pytest.raises(CorruptFileError, match="lack x, y or z"):
        read_pcd(str(tmp_path / "noz.pcd"))
    for kind in ("ascii", "binary"):
        _write_pcd(tmp_path / "empty.pcd", list("xyz"), [4] * 3, ["F"] * 3, [1] * 3, data[:0], kind)
        with pytest.raises(CorruptFileError, match=r"empty\.pcd.*empty point cloud"):
            read_pcd(str(tmp_path / "empty.pcd"))
    nan = cloud[:, :3].copy()
    nan[3, 1] = np.nan
    _write_pcd(tmp_path / "nan.pcd", list("xyz"), [4] * 3, ["F"] * 3, [1] * 3, nan, "ascii")
    with pytest.raises(CorruptFileError, match=r"nan\.pcd.*NaN"):
        read_pcd(str(tmp_path / "nan.pcd"))


@pytest.mark.skipif(not HAVE_LASPY, reason='laspy is not installed (pip install "laspy[lazrs]")')
@pytest.mark.parametrize("ending", [".las", ".laz"])
def test_las_and_laz_written_with_laspy(tmp_path, ending):
    import laspy
    if ending == ".laz" and not laspy.LazBackend.detect_available():
        pytest.skip("no LAZ backend installed (pip install lazrs)")
    cloud = _cloud(300).astype(np.float64) + [500000.0, 4000000.0, 100.0, 0.0]
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, [500000.0, 4000000.0, 0.0]
    las = laspy.LasData(header)
    las.x, las.y, las.z = cloud[:, 0], cloud[:, 1], cloud[:, 2]
    las.intensity = np.arange(300, dtype=np.uint16) * 100
    las.write(str(tmp_path / f"a{ending}"))
    out = read_las(str(tmp_path / f"a{ending}"), dtype=np.float64)
    np.testing.assert_allclose(out[:, :3], cloud[:, :3], atol=0.0006)
    np.testing.assert_array_equal(out[:, 3], np.arange(300) * 100)
    assert read_points(str(tmp_path / f"a{ending}")).dtype == np.float32


@pytest.mark.skipif(not HAVE_LASPY or not os.path.isfile(aerial_tile_path()),
                    reason="the aerial tile is not fetched (bash scripts/install.sh) or laspy is missing")
def test_real_aerial_tile():
    cloud = read_las(aerial_tile_path(), dtype=np.float64)
    assert cloud.shape == (AERIAL_TILE_POINTS, 4)
    every = AerialTileDataset(grid=4, min_points=1)
    assert sum(len(s["points"]) for s in every) == AERIAL_TILE_POINTS
    train, test = AerialTileDataset("train"), AerialTileDataset("test")
    assert len(train) + len(test) == len(AerialTileDataset()) and len(test) >= 1
    pts = train[0]["points"]
    assert pts.dtype == torch.float32 and pts.shape[1] == 4
    assert pts[:, :2].abs().max() < 40 and abs(float(pts[:, 2].mean())) < 1e-3  # centred, not georeferenced


def test_aerial_tile_missing_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/install.sh"):
        AerialTileDataset(path=str(tmp_path / "none.laz"))


# --------------------------------------------------------------------------------------------
# folder dataset


def _folder(root) -> None:
    for cls, seed in (("car", 1), ("pedestrian", 2)):
        (root / cls).mkdir(parents=True)
        _cloud(300, seed=seed).tofile(root / cls / "0.bin")
        np.save(root / cls / "1.npy", _cloud(50, 3, seed=seed + 10))
    (root / "car" / "bad.bin").write_bytes(b"\0" * 20)


def test_point_folder_labels_skips_and_subsamples(tmp_path, caplog):
    _folder(tmp_path)
    ds = PointFolderDataset(str(tmp_path), max_points=100)
    assert len(ds) == 4 and ds.classes == ["car", "pedestrian"] and list(ds.labels) == [0, 0, 1, 1]
    assert [p for p, _ in ds.skipped] == [str(tmp_path / "car" / "bad.bin")] and "skipped 1" in caplog.text
    first = ds[0]
    assert first["text"] == "a car" and ds[2]["text"] == "a pedestrian" and first["points"].shape == (100, 4)
    assert torch.equal(first["points"], ds[0]["points"])  # deterministic per index
    full = read_bin(str(tmp_path / "car" / "0.bin"))
    assert np.isin(first["points"][:, 0].numpy(), full[:, 0]).all()
    draws = [ds.sample(0, torch.Generator().manual_seed(s))["points"] for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    small = ds[1]["points"]
    assert small.shape == (50, 4) and torch.all(small[:, 3] == 0)  # xyz files get zero intensity
    with pytest.raises(CorruptFileError, match="bad.bin.*20 bytes"):
        PointFolderDataset(str(tmp_path), strict=True)


def test_point_folder_flat_and_through_the_loader(tmp_path):
    for i in range(3):
        _cloud(100 + 10 * i, seed=i).tofile(tmp_path / f"{i}.bin")
    ds = PointFolderDataset(str(tmp_path), channels=3)
    assert ds.labels is None and "label" not in ds[0] and ds[2]["points"].shape == (120, 3)
    aug = AugmentedDataset(ds, [T.RotateZ(), T.PointDropout(0.5)], key="points", seed=0)
    batch = collate([aug[(i, 0)] for i in range(3)])
    assert batch["points"].shape == (3, 60, 3) and batch["points_padding"].sum(1).tolist() == [10, 5, 0]


# --------------------------------------------------------------------------------------------
# transforms


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rotate_z_keeps_xy_norms_and_z():
    x = torch.from_numpy(_cloud())
    y = T.RotateZ()(x, _gen())
    torch.testing.assert_close(y[:, :2].norm(dim=1), x[:, :2].norm(dim=1))
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.allclose(y, x)
    quarter = T.RotateZ([90, 90])(x, _gen())
    torch.testing.assert_close(quarter[:, :2], torch.stack([-x[:, 1], x[:, 0]], 1), rtol=0, atol=1e-5)


def test_range_crop_keeps_exactly_the_points_inside():
    x = torch.from_numpy(_cloud(1000))
    bounds = [-5.0, -8.0, -1.0, 6.0, 4.0, 1.5]
    y = T.RangeCrop(bounds)(x)
    inside = [p for p in x.tolist() if all(bounds[i] <= p[i] <= bounds[i + 3] for i in range(3))]
    assert 0 < len(inside) < 1000 and y.tolist() == inside


def test_dropout_subsample_jitter_flip():
    x = torch.from_numpy(_cloud(1000))
    kept = T.PointDropout(0.3)(x, _gen())
    assert len(kept) == 700 and set(map(tuple, kept.tolist())) <= set(map(tuple, x.tolist()))
    lengths = [len(T.PointDropout([0.1, 0.9])(x, _gen(s))) for s in range(20)]
    assert min(lengths) >= 100 and max(lengths) <= 900 and len(set(lengths)) > 5
    sub = T.Subsample(256)(x, _gen())
    assert len(sub) == 256 and len(set(map(tuple, sub.tolist()))) == 256 and len(T.Subsample(5000)(x, _gen())) == 1000
    jit = T.Jitter(sigma=0.05, clip=0.02)(x, _gen())
    diff = jit - x
    assert diff[:, :3].abs().max() <= 0.02 + 1e-6 and diff[:, :3].abs().max() > 0.019 and torch.all(diff[:, 3] == 0)
    flipped = T.RandomFlip(p=1.0)(x, _gen())
    assert torch.equal(flipped[:, :2], -x[:, :2]) and torch.equal(flipped[:, 2:], x[:, 2:])
    assert torch.equal(T.RandomFlip(y=False, p=1.0)(x, _gen())[:, 1], x[:, 1])


def test_transforms_are_deterministic_under_a_generator_and_validate():
    x = torch.from_numpy(_cloud(500))
    chain = [T.RotateZ([-30, 30]), T.RandomFlip(), T.PointDropout([0.0, 0.5]), T.Jitter(), T.Subsample(200)]

    def run(seed):
        g, y = _gen(seed), x
        for t in chain:
            y = t(y, g)
        return y

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    for make, match in [(lambda: T.RangeCrop([0, 0, 0, 1, 1]), "bounds must be"),
                        (lambda: T.RangeCrop([2, 0, 0, 1, 1, 1]), "minimum <= its maximum"),
                        (lambda: T.RotateZ([30, -30]), "low <= high"), (lambda: T.PointDropout(1.5), r"fraction must be in"),
                        (lambda: T.Jitter(sigma=-1), ">= 0"), (lambda: T.Subsample(0), ">= 1"),
                        (lambda: T.RandomFlip(x=False, y=False), "at least one")]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match=r"\[N, C >= 3\]"):
        T.RotateZ()(torch.zeros(10, 2), _gen())


# --------------------------------------------------------------------------------------------
# multi-sweep concatenation


def test_concat_sweeps_moves_older_points_into_the_current_frame():
    static = np.array([[10.0, 2.0, 0.5, 0.3]], dtype=np.float32)  # one world point, seen from two poses
    now, before = np.eye(4), np.eye(4)
    before[:3, 3] = [-2.0, 0.0, 0.0]  # the sensor was 2 m behind
    c, s = math.cos(0.3), math.sin(0.3)
    before[:2, :2] = [[c, -s], [s, c]]
    seen_before = (np.linalg.inv(before) @ np.r_[static[0, :3], 1.0])[:3]
    merged = concat_sweeps([static, np.r_[seen_before, 0.3][None].astype(np.float32)], [1.0, 0.9], [now, before])
    assert merged.shape == (2, 5) and merged.dtype == np.float32
    np.testing.assert_allclose(merged[:, :4], np.repeat(static, 2, 0), atol=1e-5)
    np.testing.assert_allclose(merged[:, 4], [0.0, -0.1], atol=1e-6)
    with pytest.raises(ValueError, match="equally many"):
        concat_sweeps([static], [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# generated data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lidar_cache"))


def test_shapes_deterministic_balanced_split_disjoint(cache, tmp_path):
    train = ShapesDataset("train", size=60, points=256, cache_dir=cache)
    again = ShapesDataset("train", size=60, points=256, cache_dir=str(tmp_path))  # generated afresh
    cached = ShapesDataset("train", size=60, points=256, cache_dir=cache)
    test = ShapesDataset("test", size=30, points=256, cache_dir=cache)
    assert os.path.isfile(train.cache_path)
    for other in (again, cached):
        np.testing.assert_array_equal(other._points, train._points)
        np.testing.assert_array_equal(other.labels, train.labels)
    assert np.bincount(train.labels, minlength=10).tolist() == [6] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [3] * 10
    assert not np.isclose(train._points[:, None, :4], test._points[None, :, :4]).all(axis=(2, 3)).any()
    item = train[5]
    assert item["points"].shape == (256, 3) and item["points"].dtype == torch.float32
    assert item["text"] in {f"a {SHAPE_CLASSES[item['label']]}", f"an {SHAPE_CLASSES[item['label']]}"}
    assert abs(float(item["points"].mean())) < 1e-5  # centred
    other_seed = ShapesDataset("train", size=60, points=256, seed=1, cache_dir=cache)
    assert not np.array_equal(other_seed._points, train._points)


def test_shapes_without_noise_or_cuts_lie_on_their_surfaces(cache):
    ds = ShapesDataset("test", size=20, points=200, noise=0.0, partial=0.0, scale=[1, 1], anisotropy=[1, 1],
                       rotation="z", cache_dir=cache)
    for i in range(len(ds)):
        p = ds._points[i].astype(np.float64)
        name = SHAPE_CLASSES[ds.labels[i]]
        if name == "sphere":  # least-squares sphere through the points: |p|^2 = 2 c.p + k
            (cx, cy, cz, k), *_ = np.linalg.lstsq(np.column_stack([2 * p, np.ones(len(p))]), (p ** 2).sum(1), rcond=None)
            radius = np.linalg.norm(p - [cx, cy, cz], axis=1)
            assert np.allclose(radius, 1.0, atol=1e-5)
        if name in ("cylinder", "torus", "sphere", "cube"):  # symmetric about z: the xy-extent is rotation-free
            assert np.ptp(p[:, 2]) == pytest.approx({"cylinder": 2.0, "torus": 0.56, "sphere": 2.0, "cube": 1.6}[name], abs=0.06)


def _surface_distance(world: np.ndarray, scene: dict) -> np.ndarray:
    """Unsigned distance of points to the nearest scene surface, from signed distance functions."""
    best = np.abs(world[:, 2])  # ground plane z = 0
    for cx, cy, cz, lx, ly, lz, yaw in scene["boxes"]:
        c, s = math.cos(yaw), math.sin(yaw)
        rel = world - [cx, cy, cz]
        local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1)
        q = np.abs(local) - [lx / 2, ly / 2, lz / 2]
        sdf = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
        best = np.minimum(best, np.abs(sdf))
    for cx, cy, r, z0, z1 in scene["cylinders"]:
        q = np.stack([np.hypot(world[:, 0] - cx, world[:, 1] - cy) - r, np.maximum(z0 - world[:, 2], world[:, 2] - z1)], 1)
        sdf = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
        best = np.minimum(best, np.abs(sdf))
    return best


def test_sweep_points_lie_on_the_scene_surfaces(cache):
    ds = LidarSweepsDataset("test", size=8, range_noise=0.0, sweeps=2, cache_dir=cache)
    for i in range(4):  # one scene of each type
        item = ds[i]
        pts = item["points"].numpy().astype(np.float64)
        assert pts.shape[1] == 5 and set(np.unique(pts[:, 4]).round(6)) == {0.0, -0.1}
        world = pts[:, :3] + ds.sensor_position(i)
        assert _surface_distance(world, ds.scene(i)).max() < 2e-3
        current = pts[pts[:, 4] == 0]
        assert np.linalg.norm(current[:, :3], axis=1).max() <= ds.max_range + 1e-3
        assert current[:, 2].min() > -ds.sensor_height - 1e-3  # nothing below the ground ...
        assert (np.abs(current[:, 2] + ds.sensor_height) < 1e-3).mean() > 0.3  # ... and much on it
        assert ((0 <= current[:, 3]) & (current[:, 3] <= 1)).all()
        assert item["text"].startswith(f"a {ds.classes[item['label']]}")


def test_sweeps_deterministic_balanced_and_noisy(cache, tmp_path):
    train = LidarSweepsDataset("train", size=12, cache_dir=cache)
    fresh = LidarSweepsDataset("train", size=12, cache_dir=str(tmp_path))
    test = LidarSweepsDataset("test", size=12, cache_dir=cache)
    assert np.bincount(train.labels).tolist() == [3, 3, 3, 3]
    first = train[0]["points"]
    assert 15_000 < len(first) < 35_000 and first.shape[1] == 4, len(first)
    assert torch.equal(first, fresh[0]["points"]) and train[0]["text"] == fresh[0]["text"]
    assert not any(np.array_equal(train.scene(0)["boxes"], test.scene(j)["boxes"]) and
                   np.array_equal(train.scene(0)["cylinders"], test.scene(j)["cylinders"]) for j in range(12))
    world = first.numpy()[:, :3].astype(np.float64) + train.sensor_position(0)
    off = _surface_distance(world, train.scene(0))
    assert 0.001 < np.median(off) < 0.03 and np.quantile(off, 0.999) < 0.1  # 2 cm range noise
    big = LidarSweepsDataset("train", size=12, points=120_000, cache_dir=cache)
    n = len(big[1]["points"])
    assert 100_000 < n < 140_000, n  # its speed: benchmarks/lidar_ops.py
    batch = collate([train[0], train[1]])
    assert batch["points_padding"].shape == batch["points"].shape[:2] and isinstance(batch["text"], list)
