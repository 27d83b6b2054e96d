"""Moving digits: the classic Moving-MNIST construction from the bundled real MNIST, with labels
that separate appearance (which digit) from motion (which direction).

Each clip shows ONE MNIST digit (from the MNIST split of the same name, so train and test clips
never share a digit image) moving on a black ``image_size x image_size`` canvas::

    {"video": FloatTensor[1, T, H, W] in [0, 1], "label": digit, "motion": direction index,
     "speed": pixels per frame, "text": "a seven"}

Motion model (the choice this module makes, documented here):

* The digit's *ink* (its bounding box of non-zero pixels, at most 20x20 in MNIST; the 28x28
  cell's border is black anyway) moves in a straight line at ``speed`` pixels per frame along
  direction ``k``: angle ``2*pi*k / num_directions``, counter-clockwise on screen, ``k = 0`` to
  the right (column displacement ``+speed*cos``, row displacement ``-speed*sin``).
* It **bounces** off the walls (mirror reflection of the position, as in the original Moving
  MNIST); it never leaves the canvas and never wraps around. ``motion`` is the heading at the
  first frame; after a bounce the digit travels along the mirrored direction. Positions are
  continuous and rounded to whole pixels for drawing, so the digit itself is never resampled.
* The start position is uniform over all positions where the ink fits, drawn independently of
  the direction, so the first frame carries no information about the direction. (On any bounded
  canvas without wrap-around, later frames of a clip cannot be exactly independent of the
  initial heading too: after ``t`` steps heading right the digit is more likely in the right
  part of the canvas. Only frame 0 is guaranteed uninformative.)
* Directions and speeds are assigned by cycling through all (direction, speed) pairs and
  shuffling, so every direction has ``size / num_directions`` clips (+-1), independently of the
  digit, which is drawn by a seeded permutation of the MNIST split.

The dataset is a pure function of ``(split, size, frames, image_size, num_directions, speeds,
seed)``. It is generated on first use (about a second for 2000 clips of 16x32x32) and cached as
a compressed ``.npz`` of uint8 videos plus labels in ``cache_dir`` (default
``$ANYMODAL_CACHE/moving_digits``, else ``$XDG_CACHE_HOME/anymodal/moving_digits``, else
``~/.cache/anymodal/moving_digits``). The file name encodes every parameter and a format version;
files are written to a temporary name and renamed into place, so an interrupted write never
leaves a partial cache; a cache that cannot be read or does not match is regenerated with a
logged warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.args import int_arg
from ...core.data import cache_dir
from ...core.errors import DataError
from ..image.data import DIGIT_WORDS, MNIST_SHA256, load_mnist

__all__ = ["MovingDigitsDataset", "default_cache_dir", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

#: Bump when the generation procedure or the file layout changes: old caches are then ignored.
FORMAT_VERSION = 1

_SPLITS = ("train", "test")
_DIGIT_CELL = 28  # side of an MNIST image


def default_cache_dir() -> str:
    """The moving digits' cache folder: ``moving_digits`` in `anymodal.core.data.cache_dir`."""
    return cache_dir("moving_digits")


def _article(word: str) -> str:
    return "an" if word == "eight" else "a"  # by sound: "a one", "an eight"


def _fold(u: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Mirror-reflect unfolded positions ``u`` into ``[0, room]`` (a ball between two walls)."""
    period = 2.0 * room
    m = np.mod(u, period)
    return np.where(m <= room, m, period - m)


def _ink_boxes(images: np.ndarray) -> np.ndarray:
    """``[n, 4]`` (top, left, height, width) of the non-zero pixels of ``images [n, 28, 28]``."""
    nz = images > 0
    rows, cols = nz.any(axis=2), nz.any(axis=1)
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    bottom = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    right = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([top, left, bottom - top, right - left], axis=1)


class MovingDigitsDataset(Dataset):
    """One real MNIST digit bouncing around a black canvas; labels for digit and direction.

    Args:
        split: ``"train"`` (digits from MNIST's 60,000 training images) or ``"test"`` (from its
            10,000 test images).
        size: Number of clips. Digits are drawn without replacement until the split is used up,
            then from a fresh permutation.
        frames: Frames per clip ``T`` (at least 2).
        image_size: Canvas side ``H = W``; at least ``28 + 2 * max(speeds)``, so that even a
            digit filling its whole 28x28 cell can take two steps between bounces.
        num_directions: Number of directions, evenly spaced angles ``2*pi*k / num_directions``
            (at least 2).
        speeds: Speeds in pixels per frame (positive integers), drawn balanced per direction.
        seed: Seed of the whole construction.
        cache_dir: Folder of the ``.npz`` cache; see :func:`default_cache_dir`.

    Attributes:
        labels: ``np.ndarray`` int64 digit classes, in item order.
        motions: ``np.ndarray`` int64 direction indices (heading at frame 0).
        speeds: ``np.ndarray`` int64 speed of each clip, in pixels per frame.
        speed_values: The ``speeds`` argument, sorted, as a tuple.
        indices: ``np.ndarray`` int64 positions of the digits in the MNIST split.
        positions: ``np.ndarray`` int16 ``[N, T, 2]`` (row, column) of the top-left corner of the
            digit's ink box in every frame.
        angles: ``np.ndarray`` float64 ``[num_directions]`` angle of each direction, in radians.
        num_classes: 10.
        num_motions: ``num_directions``.
        cache_path: The cache file used.
    """

    num_classes = 10

    def __init__(
        self,
        split: str,
        size: int = 2000,
        frames: int = 16,
        image_size: int = 32,
        num_directions: int = 8,
        speeds: Sequence[int] = (1, 2),
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise DataError(
                f"unknown moving digits split {split!r}; valid splits: {list(_SPLITS)}"
            )
        size = int_arg("size", size, 1)
        frames = int_arg("frames", frames, 2)
        num_directions = int_arg("num_directions", num_directions, 2)
        seed = int_arg("seed", seed, 0)
        if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence) or not speeds:
            raise DataError(
                f"speeds must be a non-empty list of positive integers, got {speeds!r}"
            )
        speed_list = sorted(int_arg("speeds[]", s, 1) for s in speeds)
        if len(set(speed_list)) != len(speed_list):
            raise DataError(f"speeds must not repeat a value, got {list(speeds)!r}")
        image_size = int_arg("image_size", image_size, 1)
        minimum = _DIGIT_CELL + 2 * speed_list[-1]
        if image_size < minimum:
            raise DataError(
                f"image_size must be at least 28 + 2 * max(speeds) = {minimum} so that a 28x28 "
                f"MNIST digit has room to move at speed {speed_list[-1]} (it bounces off the "
                f"walls); got image_size={image_size}"
            )

        self.split = split
        self.size, self.frames, self.image_size = size, frames, image_size
        self.num_directions, self.speed_values, self.seed = num_directions, tuple(speed_list), seed
        self.num_motions = num_directions
        self.angles = 2.0 * np.pi * np.arange(num_directions) / num_directions

        cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = os.path.join(cache_dir, self._file_name())
        arrays = self._load_cache()
        if arrays is None:
            arrays = self._generate()
            self._save_cache(arrays)
        self._videos: np.ndarray = arrays["videos"]
        self.labels: np.ndarray = arrays["labels"]
        self.skipped: list[tuple[str, str]] = []  # generated: a damaged cache is made again, never skipped
        self.motions: np.ndarray = arrays["motions"]
        self.speeds: np.ndarray = arrays["speeds"]
        self.indices: np.ndarray = arrays["indices"]
        self.positions: np.ndarray = arrays["positions"]

    # ----------------------------------------------------------------------------------------
    # the dataset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index])
        word = DIGIT_WORDS[label]
        return {
            "video": torch.from_numpy(self._videos[index]).float().div_(255.0).unsqueeze(0),
            "label": label,
            "motion": int(self.motions[index]),
            "speed": int(self.speeds[index]),
            "text": f"{_article(word)} {word}",
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, frames={self.frames}, "
            f"image_size={self.image_size}, num_directions={self.num_directions}, "
            f"speeds={list(self.speed_values)}, seed={self.seed})"
        )

    # ----------------------------------------------------------------------------------------
    # generation

    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "size": self.size,
            "frames": self.frames,
            "image_size": self.image_size,
            "num_directions": self.num_directions,
            "speeds": list(self.speed_values),
            "seed": self.seed,
            "mnist_sha256": MNIST_SHA256,
        }

    def _file_name(self) -> str:
        speeds = "-".join(str(s) for s in self.speed_values)
        return (
            f"moving_digits_v{FORMAT_VERSION}_{self.split}_n{self.size}_t{self.frames}"
            f"_hw{self.image_size}_dir{self.num_directions}_speeds{speeds}_seed{self.seed}.npz"
        )

    def _generate(self) -> dict[str, np.ndarray]:
        n, T, S = self.size, self.frames, self.image_size
        images, digit_labels = load_mnist()[self.split]
        rng = np.random.default_rng([self.seed, _SPLITS.index(self.split), FORMAT_VERSION])

        # digits: consecutive seeded permutations of the split
        reps = -(-n // len(digit_labels))
        indices = np.concatenate([rng.permutation(len(digit_labels)) for _ in range(reps)])[:n]
        digits = np.rint(images[indices].reshape(n, _DIGIT_CELL, _DIGIT_CELL) * 256.0)
        digits = np.clip(digits, 0, 255).astype(np.uint8)  # the pickle stores k / 256 exactly
        boxes = _ink_boxes(digits)

        # directions and speeds: every (direction, speed) pair in turn, shuffled
        num_speeds = len(self.speed_values)
        pair = rng.permutation(np.arange(n) % (self.num_directions * num_speeds))
        motions = (pair % self.num_directions).astype(np.int64)
        speeds = np.asarray(self.speed_values, dtype=np.int64)[pair // self.num_directions]

        # trajectories of the ink box's top-left corner, (row, column), continuous then rounded
        room = (S - boxes[:, 2:4]).astype(np.float64)  # [n, 2] free travel per axis
        start = rng.uniform(0.0, 1.0, size=(n, 2)) * room
        angle = self.angles[motions]
        velocity = speeds[:, None] * np.stack([-np.sin(angle), np.cos(angle)], axis=1)
        unfolded = start[:, None, :] + velocity[:, None, :] * np.arange(T)[None, :, None]
        positions = np.rint(_fold(unfolded, room[:, None, :])).astype(np.int64)
        positions = np.clip(positions, 0, room[:, None, :].astype(np.int64))  # guard float edge

        videos = np.zeros((n, T, S, S), dtype=np.uint8)
        for i in range(n):
            top, left, h, w = boxes[i]
            ink = digits[i, top:top + h, left:left + w]
            for t in range(T):
                r, c = positions[i, t]
                videos[i, t, r:r + h, c:c + w] = ink
        return {
            "videos": videos,
            "labels": digit_labels[indices].astype(np.int64),
            "motions": motions,
            "speeds": speeds,
            "indices": indices.astype(np.int64),
            "positions": positions.astype(np.int16),
        }

    # ----------------------------------------------------------------------------------------
    # cache

    def _expected_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        n, T, S = self.size, self.frames, self.image_size
        i64 = np.dtype(np.int64)
        return {
            "videos": ((n, T, S, S), np.dtype(np.uint8)),
            "labels": ((n,), i64),
            "motions": ((n,), i64),
            "speeds": ((n,), i64),
            "indices": ((n,), i64),
            "positions": ((n, T, 2), np.dtype(np.int16)),
        }

    def _load_cache(self) -> dict[str, np.ndarray] | None:
        path = self.cache_path
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta != self._meta():
                    raise ValueError(f"it was made with other settings: {meta}")
                arrays = {}
                for key, (shape, dtype) in self._expected_shapes().items():
                    value = data[key]
                    if value.shape != shape or value.dtype != dtype:
                        raise ValueError(
                            f"array {key!r} has shape {value.shape} {value.dtype}, "
                            f"expected {shape} {dtype}"
                        )
                    arrays[key] = value
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning(
                "moving digits cache %s is unreadable or stale (%s: %s); regenerating it",
                path,
                type(exc).__name__,
                exc,
            )
            return None
        logger.debug("loaded moving digits from %s", path)
        return arrays

    def _save_cache(self, arrays: dict[str, np.ndarray]) -> None:
        folder = os.path.dirname(self.cache_path)
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, meta=np.array(json.dumps(self._meta())), **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.cache_path)
            tmp = None
            logger.info("wrote moving digits cache %s", self.cache_path)
        except OSError as exc:
            logger.warning(
                "could not write moving digits cache %s (%s); keeping the clips in memory only",
                self.cache_path,
                exc,
            )
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
