"""Tests for ``anymodal.plugins.video.moving_digits.MovingDigitsDataset``."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from anymodal.plugins.video import moving_digits
from anymodal.plugins.image.data import DIGIT_WORDS, MnistDataset
from anymodal.plugins.video.moving_digits import MovingDigitsDataset, default_cache_dir

SMALL = dict(size=96, frames=6, image_size=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moving_digits_cache")


@pytest.fixture(scope="module")
def default_train(cache) -> MovingDigitsDataset:
    """Default clip settings (16 frames of 32x32, 8 directions, speeds 1 and 2), 200 clips."""
    return MovingDigitsDataset("train", size=200, cache_dir=str(cache))


def _ink_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the non-zero pixels of one frame."""
    rows, cols = np.flatnonzero(frame.any(1)), np.flatnonzero(frame.any(0))
    return rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def _centre_of_mass(frames: np.ndarray) -> np.ndarray:
    """``[..., H, W]`` -> ``[..., 2]`` (row, column) centre of mass."""
    h, w = frames.shape[-2:]
    mass = frames.sum((-2, -1))
    rows = (frames * np.arange(h)[:, None]).sum((-2, -1)) / mass
    cols = (frames * np.arange(w)[None, :]).sum((-2, -1)) / mass
    return np.stack([rows, cols], -1)


def _angle_bin(d_row: np.ndarray, d_col: np.ndarray, num_directions: int) -> np.ndarray:
    """Direction index of a displacement (counter-clockwise on screen, 0 = right)."""
    angle = np.arctan2(-d_row, d_col)
    return np.round(angle / (2 * np.pi / num_directions)).astype(int) % num_directions


# ------------------------------------------------------------------------------------------
# items


def test_items_shapes_dtypes_ranges(default_train):
    ds = default_train
    assert len(ds) == 200 and ds.num_classes == 10 and ds.num_motions == 8
    for index in (0, 57, 199):
        item = ds[index]
        assert set(item) == {"video", "label", "motion", "speed", "text"}
        video = item["video"]
        assert video.shape == (1, 16, 32, 32) and video.dtype == torch.float32
        assert float(video.min()) == 0.0 and 0.0 < float(video.max()) <= 1.0
        levels = video * 255
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # uint8 levels
        assert isinstance(item["label"], int) and 0 <= item["label"] < 10
        assert isinstance(item["motion"], int) and 0 <= item["motion"] < 8
        assert item["speed"] in (1, 2)
        assert item["label"] == ds.labels[index] and item["motion"] == ds.motions[index]
        # the whole digit is visible in every frame: the same amount of ink in each
        ink = video.sum((0, 2, 3))
        assert torch.allclose(ink, ink[0].expand_as(ink))
    for name in ("labels", "motions", "speeds", "indices"):
        array = getattr(ds, name)
        assert array.dtype == np.int64 and array.shape == (200,)
    assert ds.positions.shape == (200, 16, 2)


def test_items_are_copies(default_train):
    item = default_train[0]
    item["video"].fill_(0.5)
    assert float(default_train[0]["video"].min()) == 0.0


def test_captions_name_the_digit_only(default_train):
    motion_words = re.compile(
        r"left|right|up|down|north|south|east|west|diagonal|moving|toward|degree|speed|fast|slow"
    )
    for index in range(0, 200, 7):
        item = default_train[index]
        word = DIGIT_WORDS[item["label"]]
        assert item["text"] == ("an " if word == "eight" else "a ") + word
        assert not motion_words.search(item["text"])


def test_digits_come_from_the_mnist_split_of_the_same_name(cache):
    for split in ("train", "test"):
        ds = MovingDigitsDataset(split, **SMALL, cache_dir=str(cache))
        mnist = MnistDataset(split)
        assert ds.indices.max() < len(mnist)
        for i in range(0, len(ds), 10):
            digit = np.rint(mnist[int(ds.indices[i])]["image"][0].numpy() * 256).astype(np.uint8)
            assert ds.labels[i] == mnist.labels[ds.indices[i]]
            # the ink drawn in frame 0 is exactly that MNIST image's ink
            frame = ds._videos[i, 0]
            t, l, h, w = _ink_box(frame)
            dt, dl, dh, dw = _ink_box(digit)
            assert (h, w) == (dh, dw)
            np.testing.assert_array_equal(frame[t:t + h, l:l + w], digit[dt:dt + h, dl:dl + w])
    # MNIST's train and test images are different digits, so train and test clips never share one
    train = MovingDigitsDataset("train", **SMALL, cache_dir=str(cache))
    test = MovingDigitsDataset("test", **SMALL, cache_dir=str(cache))
    assert not np.array_equal(train._videos, test._videos)


def test_digits_do_not_repeat_until_the_split_is_used_up(cache):
    ds = MovingDigitsDataset("test", size=200, frames=2, cache_dir=str(cache))
    assert len(np.unique(ds.indices)) == 200


# ------------------------------------------------------------------------------------------
# motion


def test_directions_and_speeds_are_balanced(cache):
    for size in (200, 203):
        ds = MovingDigitsDataset("train", size=size, frames=2, cache_dir=str(cache))
        counts = np.bincount(ds.motions, minlength=8)
        assert counts.max() - counts.min() <= 1, counts
        for k in range(8):
            per_speed = np.bincount(ds.speeds[ds.motions == k], minlength=3)[1:]
            assert per_speed.max() - per_speed.min() <= 1
    # and not tied to the digit: every digit class shows several directions
    ds = MovingDigitsDataset("train", size=200, frames=2, cache_dir=str(cache))
    for digit in range(10):
        assert len(np.unique(ds.motions[ds.labels == digit])) >= 4


def test_centre_of_mass_moves_along_the_labelled_direction(cache):
    """Where a clip has no bounce, the first-to-last displacement lies in the labelled bin."""
    frames, max_speed = 8, 2
    ds = MovingDigitsDataset("test", size=200, frames=frames, image_size=96, cache_dir=str(cache))
    videos = ds._videos.astype(np.float64)
    travel = max_speed * (frames - 1) + 1
    checked = 0
    for i in range(len(ds)):
        top, left, h, w = _ink_box(ds._videos[i, 0])
        # far enough from every wall that it cannot reach one within the clip
        if min(top, left, 96 - top - h, 96 - left - w) < travel:
            continue
        com = _centre_of_mass(videos[i][[0, -1]])
        d_row, d_col = com[1] - com[0]
        assert np.hypot(d_row, d_col) == pytest.approx(ds.speeds[i] * (frames - 1), abs=1.5)
        assert _angle_bin(d_row, d_col, 8) == ds.motions[i], i
        checked += 1
    assert checked >= 80


def _bounce_errors(ds: MovingDigitsDataset, motions: np.ndarray) -> np.ndarray:
    """Per clip, the largest gap between the drawn positions and a ball bouncing between the
    walls that starts where frame 0 shows the digit and heads along ``motions``."""
    n, T, S = ds.size, ds.frames, ds.image_size
    errors = np.empty(n)
    for i in range(n):
        boxes = np.array([_ink_box(ds._videos[i, t]) for t in range(T)], dtype=np.float64)
        drawn, room = boxes[:, :2], S - boxes[0, 2:]
        angle = 2 * np.pi * motions[i] / ds.num_motions
        velocity = ds.speeds[i] * np.array([-np.sin(angle), np.cos(angle)])
        unfolded = drawn[0] + velocity * np.arange(T)[:, None]
        folded = np.abs((unfolded + room) % (2 * room) - room)  # reflect into [0, room]
        errors[i] = np.abs(folded - drawn).max()
    return errors


def test_motion_is_a_straight_line_bouncing_off_the_walls(default_train):
    ds = default_train
    # rounding the start and each drawn position is worth at most one pixel
    assert _bounce_errors(ds, ds.motions).max() <= 1.0 + 1e-9
    # the check has teeth: the opposite direction does not fit
    opposite = (ds.motions + ds.num_motions // 2) % ds.num_motions
    assert (_bounce_errors(ds, opposite) > 1.0 + 1e-9).mean() > 0.9
    # and the positions attribute is what was drawn
    for i in range(0, 200, 13):
        for t in (0, 7, 15):
            assert tuple(ds.positions[i, t]) == _ink_box(ds._videos[i, t])[:2]


def _moments_of_differences(videos: np.ndarray, steps: int) -> np.ndarray:
    """Centre-of-mass shift of the first ``steps`` frame differences (a fixed linear map of the
    differences, normalized by the digit's ink): ``[N, 2 * steps]``."""
    diffs = np.diff(videos[:, : steps + 1].astype(np.float64), axis=1)
    h, w = videos.shape[-2:]
    rows = (diffs * np.arange(h)[:, None]).sum((-2, -1))
    cols = (diffs * np.arange(w)[None, :]).sum((-2, -1))
    mass = videos[:, :1].astype(np.float64).sum((-2, -1))
    return np.concatenate([rows / mass, cols / mass], axis=1)


def _probe(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # one BLAS thread: tiny problems run far slower with several threads on a busy machine
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence chatter on the pixel probe
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0))
        clf.fit(x_train, y_train)
    return clf.score(x_test, y_test)


def test_a_single_frame_does_not_reveal_the_direction(cache):
    """Logistic regression on the first frame is at chance; on frame differences it is high."""
    kw = dict(frames=4, image_size=40, speeds=(2,), cache_dir=str(cache))
    train = MovingDigitsDataset("train", size=400, **kw)
    test = MovingDigitsDataset("test", size=200, **kw)
    first = lambda ds: ds._videos[:, 0].reshape(len(ds), -1) / 255.0  # noqa: E731
    acc_frame = _probe(first(train), train.motions, first(test), test.motions)
    assert acc_frame < 0.3, acc_frame  # chance is 1/8
    # the same kind of probe reads the direction off how the frames change
    acc_motion = _probe(
        _moments_of_differences(train._videos, 3), train.motions,
        _moments_of_differences(test._videos, 3), test.motions,
    )
    assert acc_motion > 0.8, acc_motion
    # the first frame's position (its centre of mass) says nothing either
    com = lambda ds: _centre_of_mass(ds._videos[:, 0].astype(np.float64))  # noqa: E731
    acc_position = _probe(com(train), train.motions, com(test), test.motions)
    assert acc_position < 0.3, acc_position


def test_start_position_is_independent_of_direction(cache):
    ds = MovingDigitsDataset("train", size=400, frames=2, image_size=40, cache_dir=str(cache))
    room = 40 - np.array([_ink_box(ds._videos[i, 0])[2:] for i in range(len(ds))])
    relative = ds.positions[:, 0] / room  # in [0, 1] per axis
    assert relative.min() >= 0 and relative.max() <= 1
    for k in range(8):
        mean = relative[ds.motions == k].mean(0)
        assert np.all(np.abs(mean - 0.5) < 0.15), (k, mean)


# ------------------------------------------------------------------------------------------
# determinism and cache


def test_deterministic_from_seed_and_parameters(tmp_path):
    a = MovingDigitsDataset("train", **SMALL, seed=3, cache_dir=str(tmp_path / "a"))
    b = MovingDigitsDataset("train", **SMALL, seed=3, cache_dir=str(tmp_path / "b"))
    for name in ("_videos", "labels", "motions", "speeds", "indices", "positions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = MovingDigitsDataset("train", **SMALL, seed=4, cache_dir=str(tmp_path / "a"))
    assert not np.array_equal(a._videos, c._videos)
    assert not np.array_equal(a.indices, c.indices)
    # speeds are a set: their order does not change the data
    d = MovingDigitsDataset("train", **SMALL, seed=3, speeds=[2, 1], cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(a._videos, d._videos)


def test_cache_names_encode_every_parameter(tmp_path):
    base = dict(split="train", size=40, frames=4, image_size=32, num_directions=8, speeds=(1, 2),
                seed=0)
    variants = [{}, {"split": "test"}, {"size": 41}, {"frames": 5}, {"image_size": 33},
                {"num_directions": 4}, {"speeds": (1,)}, {"seed": 1}]
    paths = set()
    for change in variants:
        ds = MovingDigitsDataset(**{**base, **change}, cache_dir=str(tmp_path))
        paths.add(ds.cache_path)
        assert os.path.isfile(ds.cache_path)
        assert f"v{moving_digits.FORMAT_VERSION}" in os.path.basename(ds.cache_path)
    assert len(paths) == len(variants)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temp


def test_cache_hit_delete_and_corrupt(tmp_path, monkeypatch, caplog):
    first = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    path = Path(first.cache_path)
    assert path.is_file() and path.suffix == ".npz"

    calls = []
    original = MovingDigitsDataset._generate

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(MovingDigitsDataset, "_generate", counting)

    # a second construction loads the file
    again = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert calls == []
    np.testing.assert_array_equal(again._videos, first._videos)

    # deleted -> regenerated, identical
    path.unlink()
    again = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert calls == [1] and path.is_file()
    np.testing.assert_array_equal(again._videos, first._videos)

    # corrupt (garbage, or cut off mid-file) -> warning, regenerated, file repaired
    size = path.stat().st_size
    for damage in (b"not a zip file", path.read_bytes()[: size // 2]):
        path.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=moving_digits.__name__):
            again = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
        assert any("regenerating" in r.getMessage() and str(path) in r.getMessage()
                   for r in caplog.records)
        np.testing.assert_array_equal(again._videos, first._videos)
        np.testing.assert_array_equal(again.motions, first.motions)
    calls.clear()
    MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert calls == []  # the repaired file loads


def test_cache_with_wrong_contents_is_regenerated(tmp_path, caplog):
    first = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    with np.load(first.cache_path) as data:
        arrays = dict(data)
    arrays["videos"] = arrays["videos"][:, :3]  # wrong shape, but a valid npz
    with open(first.cache_path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    with caplog.at_level(logging.WARNING, logger=moving_digits.__name__):
        again = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert any("regenerating" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again._videos, first._videos)


def test_interrupted_write_leaves_no_cache_file(tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    def dying_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise Killed()

    monkeypatch.setattr(np, "savez_compressed", dying_savez)
    with pytest.raises(Killed):
        MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither a partial cache nor a temporary file
    monkeypatch.undo()
    ds = MovingDigitsDataset("test", **SMALL, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(ds.cache_path)]


def test_unwritable_cache_dir_warns_and_still_works(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger=moving_digits.__name__):
        ds = MovingDigitsDataset("test", **SMALL, cache_dir=str(blocker / "sub"))
    assert len(ds) == SMALL["size"] and ds[0]["video"].shape == (1, 6, 32, 32)
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYMODAL_CACHE", str(tmp_path))
    assert default_cache_dir() == os.path.join(str(tmp_path), "moving_digits")
    monkeypatch.delenv("ANYMODAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "anymodal", "moving_digits")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(
        os.path.expanduser("~"), ".cache", "anymodal", "moving_digits"
    )
    # the dataset uses it when no cache_dir is given
    monkeypatch.setenv("ANYMODAL_CACHE", str(tmp_path))
    ds = MovingDigitsDataset("test", size=8, frames=2)
    assert os.path.dirname(ds.cache_path) == os.path.join(str(tmp_path), "moving_digits")


# ------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "valid"}, "unknown moving digits split"),
        ({"image_size": 31}, r"at least 28 \+ 2 \* max\(speeds\) = 32"),
        ({"image_size": 33, "speeds": (1, 3)}, r"= 34"),
        ({"frames": 1}, "frames must be >= 2"),
        ({"size": 0}, "size must be >= 1"),
        ({"num_directions": 1}, "num_directions must be >= 2"),
        ({"speeds": ()}, "speeds must be a non-empty list"),
        ({"speeds": 2}, "speeds must be a non-empty list"),
        ({"speeds": (0, 1)}, "must be >= 1"),
        ({"speeds": (1, 1)}, "must not repeat"),
        ({"speeds": (1.5,)}, "must be an integer"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"image_size": True}, "must be an integer"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"split": "train", "size": 8, "cache_dir": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=match):
        MovingDigitsDataset(**args)
    assert os.listdir(tmp_path) == []
