"""Clip sampling and video datasets (decoding is `decode`).

Datasets return items ``{"video": FloatTensor[C, T, H, W] in [0, 1], "label": int, "text": str}``
(``label``/``text`` where known). A clip of ``frames`` frames is drawn from each video:

* ``__getitem__(index)`` always samples ``"uniform"`` (deterministic: evaluation, pictures);
* ``sample(index, generator)`` samples with the dataset's ``sampling`` mode, every random draw
  from ``generator``, so a training loader seeded per sample stays reproducible.

* :class:`VideoFileDataset` -- ``root/[split/]<class>/**/<file>.mp4`` decoded with PyAV at read time.
* :class:`FrameFolderDataset` -- ``root/[split/]<class>/<video>/<frames>.png``, one folder per video.
* :class:`NpyVideoDataset` -- ``.npy`` arrays ``[T, H, W, C]`` (one file per video) or one ``[N, T, H, W, C]``.

Frames are center-cropped to a square and resized to ``image_size`` (bilinear, antialiased) with
torch ops. PyAV (``pip install av``; its wheel bundles FFmpeg) is imported only when a video file
is opened.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ...core.args import int_arg
from ...core.data import report_skipped
from ...core.errors import CorruptFileError, DataError
from ..image.data import PIL_ERRORS, verify_image
from .decode import VideoInfo, decode_video, probe_video, verify_video

__all__ = ["VideoInfo", "probe_video", "decode_video", "verify_video", "sample_frame_indices", "SAMPLING_MODES",
           "VideoFileDataset", "FrameFolderDataset", "NpyVideoDataset"]

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("uniform", "random")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def sample_frame_indices(num_frames_in_video: int, clip_frames: int, stride: int = 1, mode: str = "uniform",
                         generator: torch.Generator | None = None) -> Tensor:
    """Frame numbers of one clip, ``LongTensor[clip_frames]``, all in ``[0, num_frames_in_video)``.

    * ``"uniform"``: the middle frame of each of ``clip_frames`` equal segments of the whole video
      (TSN-style; ``stride`` and ``generator`` are unused). A video exactly ``clip_frames`` long
      gives ``0..T-1``; a shorter one is stretched: each frame repeats about equally often.
    * ``"random"``: a random start, then every ``stride``-th frame (VideoMAE / V-JEPA clips). If the
      video is shorter than the clip's span ``(clip_frames - 1) * stride + 1``, the clip starts at
      frame 0 and repeats the video's last frame to fill the rest.

    Args:
        num_frames_in_video: Frames in the video, >= 1.
        clip_frames: Frames in the clip, >= 1.
        stride: Step between frames in ``"random"`` mode, >= 1.
        mode: One of ``SAMPLING_MODES``.
        generator: Source of the random start; ``None`` uses torch's global generator.

    Raises:
        ValueError: For an unknown mode or a non-positive count or stride.
    """
    n = int_arg("num_frames_in_video", num_frames_in_video, 1)
    k = int_arg("clip_frames", clip_frames, 1)
    stride = int_arg("stride", stride, 1)
    if mode == "uniform":
        return (2 * torch.arange(k) + 1) * n // (2 * k)
    if mode == "random":
        span = (k - 1) * stride + 1
        start = int(torch.randint(0, n - span + 1, (1,), generator=generator)) if n >= span else 0
        return (start + stride * torch.arange(k)).clamp_(max=n - 1)
    raise ValueError(f"unknown frame sampling mode {mode!r}; valid modes: {list(SAMPLING_MODES)}")


def _to_clip(frames: Tensor, image_size: int | None) -> Tensor:
    """``[T, H, W, C]`` uint8 or float -> ``[C, T, S, S]`` float in [0, 1]: central square, resized."""
    x = frames.permute(0, 3, 1, 2)  # [T, C, H, W]
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if image_size is not None:
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top:top + side, left:left + side]
        if side != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=image_size < side).clamp_(0.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()


def _natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise DataError("extensions must name at least one file ending")
    return exts


class _ClipDataset(Dataset):
    """Shared clip logic; subclasses give ``_num_frames``, ``_read`` and ``_extra``."""

    def __init__(self, frames: int, stride: int, sampling: str, image_size: int | None) -> None:
        self.frames = int_arg("frames", frames, 1)
        self.stride = int_arg("stride", stride, 1)
        if sampling not in SAMPLING_MODES:
            raise DataError(f"unknown frame sampling mode {sampling!r}; valid modes: {list(SAMPLING_MODES)}")
        self.sampling = sampling
        self.image_size = None if image_size is None else int_arg("image_size", image_size, 1)

    def _num_frames(self, index: int) -> int:
        raise NotImplementedError

    def _read(self, index: int, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def _extra(self, index: int) -> dict[str, Any]:
        return {}

    def _clip(self, index: int, mode: str, generator: torch.Generator | None) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} videos")
        index %= len(self)
        indices = sample_frame_indices(self._num_frames(index), self.frames, self.stride, mode, generator)
        return {"video": _to_clip(self._read(index, indices), self.image_size), **self._extra(index)}

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Item ``index`` with a clip drawn by the dataset's ``sampling`` mode from ``generator``."""
        return self._clip(index, self.sampling, generator)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` with its ``"uniform"`` clip (deterministic)."""
        return self._clip(index, "uniform", None)


def _class_folders(root: str, split: str | None, what: str) -> tuple[str, list[str]]:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} folder {root!r} does not exist or is not a folder")
    base = _split_folder(root, split)
    classes = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {what} folder {base!r}")
    return base, classes


def _split_folder(root: str, split: str | None) -> str:
    """``root/split`` if that is a folder, else ``root``."""
    return os.path.join(root, split) if split is not None and os.path.isdir(os.path.join(root, split)) else root


class _LabelledClips(_ClipDataset):
    """Class-folder datasets: ``samples`` of ``(path, label, num_frames)``."""

    classes: list[str]
    samples: list[tuple[str, int, int]]

    def _finish_scan(self, base: str, what: str, exts: tuple[str, ...]) -> None:
        report_skipped(self.skipped, base, what)
        if not self.samples:
            raise DataError(f"no readable {what}s with endings {list(exts)} in class folders of {base!r}"
                            + (f" ({len(self.skipped)} skipped as corrupt)" if self.skipped else ""))
        self.labels: np.ndarray = np.array([s[1] for s in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _num_frames(self, index: int) -> int:
        return self.samples[index][2]

    def _extra(self, index: int) -> dict[str, Any]:
        label = self.samples[index][1]
        return {"label": label, "text": f"a video of a {self.classes[label].replace('_', ' ')}"}


def _count_frames(path: str, verify: bool) -> int:
    """Frames of a video file: all decoded (``verify``) or read from its header."""
    count = verify_video(path) if verify else probe_video(path).num_frames
    if count < 1:
        raise CorruptFileError(path, "no frames (the header declares none and the stream holds no packets)")
    return count


class VideoFileDataset(_LabelledClips):
    """Video files in class sub-folders: ``root/[split/]<class_name>/**/<file>``, decoded at read time.

    With ``verify`` (the default) every file is decoded whole while scanning (no frame is kept),
    so a file cut inside its frame data -- whose header reads fine -- is found up front; without
    it only container headers are read (cheap) and such a file fails when it is read. Files that
    fail the scan are skipped, listed in :attr:`skipped` and reported in one logged warning; with
    ``strict=True`` the first raises :class:`CorruptFileError`. A file that fails later, while
    decoding, raises :class:`CorruptFileError` naming it.

    Args:
        root: Dataset folder.
        split: If ``root/split`` is a folder, read it, else read ``root``.
        frames: Frames per clip.
        stride: Step between clip frames in ``"random"`` sampling.
        sampling: Mode used by :meth:`sample` (``"uniform"`` or ``"random"``).
        image_size: Side of the square output frames (center crop, then resize); None keeps them.
        strict: Raise on the first unreadable file instead of skipping it.
        verify: Decode every file while scanning (cost: one pass over the data).
        extensions: File endings (case-insensitive) that count as videos.

    Attributes:
        classes, samples (``(path, label, num_frames)``), labels, num_classes, skipped
        (``(path, reason)``), as in ``ImageFolderDataset``.
    """

    def __init__(self, root: str, split: str | None = None, frames: int = 16, stride: int = 2,
                 sampling: str = "uniform", image_size: int | None = 112, strict: bool = False, verify: bool = True,
                 extensions: Sequence[str] = (".mp4", ".webm", ".avi", ".mkv")) -> None:
        super().__init__(frames, stride, sampling, image_size)
        exts = _extensions(extensions)
        self.root, self.classes = _class_folders(root, split, "video")
        self.samples, self.skipped = [], []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name), followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if not f.lower().endswith(exts):
                        continue
                    path = os.path.join(dirpath, f)
                    try:
                        self.samples.append((path, label, _count_frames(path, verify)))
                    except CorruptFileError as exc:
                        if strict:
                            raise
                        self.skipped.append((path, exc.reason))
        self._finish_scan(self.root, "video file", exts)

    def _read(self, index: int, indices: Tensor) -> Tensor:
        return decode_video(self.samples[index][0], indices=indices)


def _frames_fault(paths: Sequence[str]) -> str | None:
    """Why these frame files cannot make clips (one does not decode, their sizes differ), or None."""
    sizes: dict[tuple[int, int], str] = {}
    for path in paths:
        reason = verify_image(path)
        if reason is not None:
            return f"{os.path.basename(path)}: {reason}"
        with Image.open(path) as im:
            sizes.setdefault(im.size, os.path.basename(path))
    if len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        return f"frames have different sizes: {first} is {a[0]}x{a[1]}, {other} is {b[0]}x{b[1]}"
    return None


class FrameFolderDataset(_LabelledClips):
    """Videos stored as folders of frame images: ``root/[split/]<class_name>/<video>/<frame files>``.

    A video's frames are its image files in natural name order (``2.png`` before ``10.png``).
    With ``verify`` (the default) scanning decodes every frame and checks that a video's frames
    share one size; without it only each video's first frame is checked. A folder that fails is
    skipped and counted (or, with ``strict=True``, raises :class:`CorruptFileError`). A frame that
    fails at read time raises :class:`CorruptFileError`.

    Args:
        root, split, frames, stride, sampling, image_size, strict, verify: As in :class:`VideoFileDataset`.
        extensions: File endings (case-insensitive) that count as frames.
    """

    def __init__(self, root: str, split: str | None = None, frames: int = 16, stride: int = 2,
                 sampling: str = "uniform", image_size: int | None = 112, strict: bool = False, verify: bool = True,
                 extensions: Sequence[str] = _IMAGE_EXTENSIONS) -> None:
        super().__init__(frames, stride, sampling, image_size)
        exts = _extensions(extensions)
        self.root, self.classes = _class_folders(root, split, "frame")
        self.samples, self.skipped = [], []
        self._frames: list[list[str]] = []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(self.root, name)
            for video in sorted((e.name for e in os.scandir(class_dir) if e.is_dir()), key=_natural_key):
                folder = os.path.join(class_dir, video)
                files = sorted((f for f in os.listdir(folder) if f.lower().endswith(exts)), key=_natural_key)
                paths = [os.path.join(folder, f) for f in files]
                reason = "no frame images" if not files else _frames_fault(paths if verify else paths[:1])
                if reason is None:
                    self.samples.append((folder, label, len(files)))
                    self._frames.append(paths)
                elif strict:
                    raise CorruptFileError(folder, reason)
                else:
                    self.skipped.append((folder, reason))
        self._finish_scan(self.root, "frame folder", exts)

    def _read(self, index: int, indices: Tensor) -> Tensor:
        paths = self._frames[index]
        loaded: dict[int, np.ndarray] = {}
        for i in dict.fromkeys(indices.tolist()):
            try:
                with Image.open(paths[i]) as im:
                    loaded[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except PIL_ERRORS as exc:
                raise CorruptFileError(paths[i], f"{type(exc).__name__}: {exc}") from exc
        shapes = {a.shape for a in loaded.values()}
        if len(shapes) > 1:
            raise CorruptFileError(self.samples[index][0], f"frames have different sizes {sorted(shapes)}")
        return torch.from_numpy(np.stack([loaded[i] for i in indices.tolist()]))


class NpyVideoDataset(_ClipDataset):
    """Videos as NumPy arrays: a folder of ``.npy`` files ``[T, H, W, C]`` (sorted by name, one video
    each) or one ``.npy`` file ``[N, T, H, W, C]`` (or a single ``[T, H, W, C]`` video).

    Arrays are memory-mapped; only the sampled frames are read. ``uint8`` arrays are scaled to
    [0, 1], floating arrays are taken as already in [0, 1]. A file that cannot be read as such an
    array (cut short, another rank or dtype) is skipped and counted in :attr:`skipped`, or with
    ``strict`` raises :class:`CorruptFileError`; so is, with ``verify``, a floating-point video
    with values that are NaN, infinite or outside [0, 1] (``path[i]`` names video ``i`` of a
    single array). A single array file that cannot be read raises: there is nothing left to read.

    Args:
        path_or_dir: The ``.npy`` file or the folder of them.
        split: If ``path_or_dir`` is a folder with a sub-folder ``split``, read that.
        labels: One int per video, or the path of a 1-D ``.npy`` integer array (a labels file
            inside the folder is not taken for a video); None for unlabelled data. A skipped
            video's label is dropped with it.
        frames, stride, sampling: As in :class:`VideoFileDataset`.
        image_size: Side of the square output frames (center crop, then resize); None keeps them.
        strict: Raise on the first unusable video instead of skipping it.
        verify: Read every floating-point video whole while scanning to check its values (uint8
            videos are always in range).

    Raises:
        FileNotFoundError: If ``path_or_dir`` does not exist.
        CorruptFileError: For a single array file that cannot be read, or with ``strict``.
        DataError: For an empty folder or a labels count that differs from the number of videos.
    """

    def __init__(self, path_or_dir: str, split: str | None = None, labels: Sequence[int] | str | None = None,
                 frames: int = 16, stride: int = 2, sampling: str = "uniform", image_size: int | None = None,
                 strict: bool = False, verify: bool = True) -> None:
        super().__init__(frames, stride, sampling, image_size)
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            path = _split_folder(path, split)
        labels_path = os.path.abspath(labels) if isinstance(labels, (str, os.PathLike)) else None
        self._array: np.ndarray | None = None
        # (file, index in the single array or None) of every video found
        if os.path.isfile(path):
            self._array = self._load(path, 5)
            found: list[tuple[str, int | None]] = [(path, i) for i in range(len(self._array))]
        elif os.path.isdir(path):
            files = sorted((os.path.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(".npy") and os.path.abspath(os.path.join(path, f)) != labels_path),
                           key=_natural_key)
            if not files:
                raise DataError(f"no .npy files in folder {path!r}")
            found = [(f, None) for f in files]
        else:
            raise FileNotFoundError(f"{path!r} is neither a .npy file nor a folder")
        if labels_path is not None:
            try:
                labels = np.load(labels_path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise CorruptFileError(labels_path, f"{type(exc).__name__}: {exc}") from exc
        all_labels = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if all_labels is not None and len(all_labels) != len(found):
            raise DataError(f"got {len(all_labels)} labels for {len(found)} videos in {path!r}")
        self.skipped: list[tuple[str, str]] = []
        self._videos: list[tuple[str, int | None, int]] = []
        kept = []
        for number, (file, index) in enumerate(found):
            try:
                self._videos.append((file, index, self._scan(file, index, verify)))
                kept.append(number)
            except CorruptFileError as exc:
                if strict:
                    raise
                self.skipped.append((exc.path, exc.reason))
        report_skipped(self.skipped, path, "video array")
        if not self._videos:
            first, reason = self.skipped[0]
            raise DataError(f"no usable videos in {path!r}: {len(self.skipped)} skipped as corrupt, the first "
                            f"{first!r}: {reason}")
        self.paths = [file for file, _, _ in self._videos]
        self.labels = None if all_labels is None else all_labels[kept]

    def _scan(self, file: str, index: int | None, verify: bool) -> int:
        """The frame count of one video, after the checks ``verify`` asks for."""
        video = self._array[index] if index is not None else self._load(file, 4)
        name = file if index is None else f"{file}[{index}]"
        if len(video) == 0 or video.size == 0:
            raise CorruptFileError(name, f"an empty video of shape {video.shape}")
        if verify and video.dtype != np.uint8:
            values = np.asarray(video)
            if not np.isfinite(values).all():
                raise CorruptFileError(name, f"{int((~np.isfinite(values)).sum())} of {values.size} values are NaN or infinite")
            if values.min() < 0 or values.max() > 1:
                raise CorruptFileError(name, f"floating-point values span [{values.min():g}, {values.max():g}]; "
                                             "a float video must be in [0, 1] (or store uint8)")
        return len(video)

    @staticmethod
    def _load(path: str, rank: int) -> np.ndarray:
        """The memory-mapped array of ``path``: ``rank`` 4 (one video) or 5 (several; one video is promoted)."""
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise CorruptFileError(path, f"holds {array.dtype} data; video arrays must be uint8 or floating point")
        if rank == 5 and array.ndim == 4:
            array = array[None]
        if array.ndim != rank:
            wanted = "[N, T, H, W, C] or [T, H, W, C]" if rank == 5 else "one video [T, H, W, C]"
            raise CorruptFileError(path, f"holds an array of shape {array.shape}; expected {wanted}")
        return array

    def __len__(self) -> int:
        return len(self._videos)

    def _num_frames(self, index: int) -> int:
        return self._videos[index][2]

    def _read(self, index: int, indices: Tensor) -> Tensor:
        file, position, _ = self._videos[index]
        video = self._array[position] if position is not None else self._load(file, 4)
        return torch.from_numpy(np.ascontiguousarray(video[indices.numpy()]))

    def _extra(self, index: int) -> dict[str, Any]:
        return {} if self.labels is None else {"label": int(self.labels[index])}
