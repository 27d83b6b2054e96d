"""Video decoding, clip sampling and video datasets.

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
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .image_data import _PIL_ERRORS, CorruptFileError, verify_image
from .image_transforms import _int_arg

__all__ = ["VideoInfo", "probe_video", "decode_video", "sample_frame_indices", "SAMPLING_MODES",
           "VideoFileDataset", "FrameFolderDataset", "NpyVideoDataset"]

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("uniform", "random")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _av():
    try:
        import av
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("decoding video files needs PyAV; install it with: pip install av") from exc
    return av


class VideoInfo(NamedTuple):
    """What `probe_video` reads from a container's header."""

    num_frames: int  # from the header, or estimated from duration x frame rate, or counted packets
    height: int
    width: int
    fps: float


def probe_video(path: str) -> VideoInfo:
    """Open a video file and read its first video stream's header (no frame is decoded).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CorruptFileError: If FFmpeg cannot open it or it has no video stream.
    """
    av = _av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise CorruptFileError(path, "no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            n = stream.frames
            if n <= 0 and rate > 0 and stream.duration and stream.time_base:
                n = round(float(stream.duration * stream.time_base) * rate)
            if n <= 0 and rate > 0 and container.duration:
                n = round(container.duration / av.time_base * rate)
            if n <= 0:  # no usable header: count packets (demuxing only, no decoding)
                n = sum(1 for p in container.demux(stream) if p.size)
            return VideoInfo(int(n), stream.codec_context.height, stream.codec_context.width, rate)
    except av.error.FFmpegError as exc:
        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc


def decode_video(path: str, indices: Sequence[int] | Tensor | None = None, max_frames: int | None = None,
                 dtype: torch.dtype = torch.uint8) -> Tensor:
    """Decode frames of a video file with PyAV, in RGB.

    Frames are decoded sequentially from the start up to the last one asked for (no seeking,
    which is frame-exact for every codec but costs time on long videos).

    Args:
        path: Video file.
        indices: Frame numbers to return, in this order (repeats allowed). Indices past the
            last frame that decodes give that last frame, unless the header declares more frames
            than decode (by over 1%, at least 2 frames; some headers are off by one): that file
            is truncated.
        max_frames: Without ``indices``: return only the first ``max_frames`` frames.
        dtype: ``torch.uint8`` (0..255) or a floating dtype (scaled to [0, 1]).

    Returns:
        ``[T, H, W, 3]`` frames.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CorruptFileError: Naming ``path``, if FFmpeg cannot open or decode it, it has no video
            stream, no frame decodes, or it ends before frames its header declares (truncated).
        ValueError: For negative indices, both ``indices`` and ``max_frames``, or another dtype.
    """
    av = _av()
    if indices is not None and max_frames is not None:
        raise ValueError("decode_video takes indices or max_frames, not both")
    wanted = None if indices is None else [int(i) for i in indices]
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise ValueError(f"decode_video needs non-empty, non-negative frame indices, got {wanted}")
    if max_frames is not None:
        _int_arg("max_frames", max_frames, 1)
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"decode_video returns uint8 or floating-point frames, got dtype {dtype}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    stop = max(wanted) + 1 if wanted is not None else max_frames
    keep = None if wanted is None else set(wanted)
    frames: dict[int, np.ndarray] = {}
    count, latest, declared = 0, None, 0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise CorruptFileError(path, "no video stream")
            stream = container.streams.video[0]
            declared = stream.frames
            for latest in container.decode(stream):
                if keep is None or count in keep:
                    frames[count] = latest.to_ndarray(format="rgb24")
                count += 1
                if stop is not None and count >= stop:
                    break
    except av.error.FFmpegError as exc:
        raise CorruptFileError(path, f"{type(exc).__name__} after {count} decoded frame(s): {exc}") from exc
    if count == 0:
        raise CorruptFileError(path, "no frame could be decoded")
    if (stop is None or count < stop) and declared - count > max(1, declared // 100):
        raise CorruptFileError(path, f"truncated: the header declares {declared} frames but only {count} decode")
    if wanted is None:
        order: Sequence[int] = range(count)
    else:
        if count - 1 not in frames:  # indices past the end show the last frame
            frames[count - 1] = latest.to_ndarray(format="rgb24")
        order = [min(i, count - 1) for i in wanted]
    video = torch.from_numpy(np.stack([frames[i] for i in order]))
    return video if dtype == torch.uint8 else video.to(dtype).div_(255.0)


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
    n = _int_arg("num_frames_in_video", num_frames_in_video, 1)
    k = _int_arg("clip_frames", clip_frames, 1)
    stride = _int_arg("stride", stride, 1)
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
        raise ValueError("extensions must name at least one file ending")
    return exts


class _ClipDataset(Dataset):
    """Shared clip logic; subclasses give ``_num_frames``, ``_read`` and ``_extra``."""

    def __init__(self, frames: int, stride: int, sampling: str, image_size: int | None) -> None:
        self.frames = _int_arg("frames", frames, 1)
        self.stride = _int_arg("stride", stride, 1)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown frame sampling mode {sampling!r}; valid modes: {list(SAMPLING_MODES)}")
        self.sampling = sampling
        self.image_size = None if image_size is None else _int_arg("image_size", image_size, 1)

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
    base = os.path.join(root, split) if split is not None and os.path.isdir(os.path.join(root, split)) else root
    classes = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class sub-folders in {what} folder {base!r}")
    return base, classes


def _report_skipped(skipped: list[tuple[str, str]], base: str, what: str) -> None:
    if skipped:
        names = ", ".join(p for p, _ in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        logger.warning("skipped %d unreadable %s(s) under %s: %s", len(skipped), what, base, names)


class _LabelledClips(_ClipDataset):
    """Class-folder datasets: ``samples`` of ``(path, label, num_frames)``."""

    classes: list[str]
    samples: list[tuple[str, int, int]]

    def _finish_scan(self, base: str, what: str, exts: tuple[str, ...]) -> None:
        _report_skipped(self.skipped, base, what)
        if not self.samples:
            raise ValueError(f"no readable {what}s with endings {list(exts)} in class folders of {base!r}"
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


class VideoFileDataset(_LabelledClips):
    """Video files in class sub-folders: ``root/[split/]<class_name>/**/<file>``, decoded at read time.

    Scanning opens every file's container header (cheap, nothing is decoded). Files FFmpeg cannot
    open, or without a video stream, are skipped, listed in :attr:`skipped` and reported in one
    logged warning; with ``strict=True`` the first raises :class:`CorruptFileError`. A file that
    fails later, while decoding, raises :class:`CorruptFileError` naming it.

    Args:
        root: Dataset folder.
        split: If ``root/split`` is a folder, read it, else read ``root``.
        frames: Frames per clip.
        stride: Step between clip frames in ``"random"`` sampling.
        sampling: Mode used by :meth:`sample` (``"uniform"`` or ``"random"``).
        image_size: Side of the square output frames (center crop, then resize); None keeps them.
        strict: Raise on the first unreadable file instead of skipping it.
        extensions: File endings (case-insensitive) that count as videos.

    Attributes:
        classes, samples (``(path, label, num_frames)``), labels, num_classes, skipped
        (``(path, reason)``), as in ``ImageFolderDataset``.
    """

    def __init__(self, root: str, split: str | None = None, frames: int = 16, stride: int = 2,
                 sampling: str = "uniform", image_size: int | None = 112, strict: bool = False,
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
                        self.samples.append((path, label, probe_video(path).num_frames))
                    except CorruptFileError as exc:
                        if strict:
                            raise
                        self.skipped.append((path, exc.reason))
        self._finish_scan(self.root, "video file", exts)

    def _read(self, index: int, indices: Tensor) -> Tensor:
        return decode_video(self.samples[index][0], indices=indices)


class FrameFolderDataset(_LabelledClips):
    """Videos stored as folders of frame images: ``root/[split/]<class_name>/<video>/<frame files>``.

    A video's frames are its image files in natural name order (``2.png`` before ``10.png``).
    Scanning lists the frames and verifies each video's first one with PIL; a folder without
    readable frames is skipped and counted (or, with ``strict=True``, raises
    :class:`CorruptFileError`). A frame that fails at read time raises :class:`CorruptFileError`.

    Args:
        root, split, frames, stride, sampling, image_size, strict: As in :class:`VideoFileDataset`.
        extensions: File endings (case-insensitive) that count as frames.
    """

    def __init__(self, root: str, split: str | None = None, frames: int = 16, stride: int = 2,
                 sampling: str = "uniform", image_size: int | None = 112, strict: bool = False,
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
                reason = "no frame images" if not files else self._verify(os.path.join(folder, files[0]))
                if reason is None:
                    self.samples.append((folder, label, len(files)))
                    self._frames.append([os.path.join(folder, f) for f in files])
                elif strict:
                    raise CorruptFileError(folder, reason)
                else:
                    self.skipped.append((folder, reason))
        self._finish_scan(self.root, "frame folder", exts)

    @staticmethod
    def _verify(path: str) -> str | None:
        reason = verify_image(path)
        return None if reason is None else f"{os.path.basename(path)}: {reason}"

    def _read(self, index: int, indices: Tensor) -> Tensor:
        paths = self._frames[index]
        loaded: dict[int, np.ndarray] = {}
        for i in dict.fromkeys(indices.tolist()):
            try:
                with Image.open(paths[i]) as im:
                    loaded[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except _PIL_ERRORS as exc:
                raise CorruptFileError(paths[i], f"{type(exc).__name__}: {exc}") from exc
        shapes = {a.shape for a in loaded.values()}
        if len(shapes) > 1:
            raise CorruptFileError(self.samples[index][0], f"frames have different sizes {sorted(shapes)}")
        return torch.from_numpy(np.stack([loaded[i] for i in indices.tolist()]))


class NpyVideoDataset(_ClipDataset):
    """Videos as NumPy arrays: a folder of ``.npy`` files ``[T, H, W, C]`` (sorted by name, one video
    each) or one ``.npy`` file ``[N, T, H, W, C]`` (or a single ``[T, H, W, C]`` video).

    Arrays are memory-mapped; only the sampled frames are read. ``uint8`` arrays are scaled to
    [0, 1], floating arrays are taken as already in [0, 1]. An unreadable file raises
    :class:`CorruptFileError` while scanning (there is no skipping here).

    Args:
        path_or_dir: The ``.npy`` file or the folder of them.
        labels: One int per video, or the path of a 1-D ``.npy`` integer array (a labels file
            inside the folder is not taken for a video); None for unlabelled data.
        frames, stride, sampling: As in :class:`VideoFileDataset`.
        image_size: Side of the square output frames (center crop, then resize); None keeps them.

    Raises:
        FileNotFoundError: If ``path_or_dir`` does not exist.
        ValueError: For arrays of the wrong rank or dtype, an empty folder or a labels count that
            differs from the number of videos.
    """

    def __init__(self, path_or_dir: str, labels: Sequence[int] | str | None = None, frames: int = 16,
                 stride: int = 2, sampling: str = "uniform", image_size: int | None = None) -> None:
        super().__init__(frames, stride, sampling, image_size)
        path = os.fspath(path_or_dir)
        labels_path = os.path.abspath(labels) if isinstance(labels, (str, os.PathLike)) else None
        self._array: np.ndarray | None = None
        if os.path.isfile(path):
            array = self._load(path)
            if array.ndim == 4:
                array = array[None]
            if array.ndim != 5:
                raise ValueError(f"{path!r} holds an array of shape {array.shape}; expected [N, T, H, W, C] or [T, H, W, C]")
            self._array, self.paths = array, [path] * len(array)
            self._lengths = [array.shape[1]] * len(array)
        elif os.path.isdir(path):
            self.paths = sorted((os.path.join(path, f) for f in os.listdir(path)
                                 if f.lower().endswith(".npy") and os.path.abspath(os.path.join(path, f)) != labels_path),
                                key=_natural_key)
            if not self.paths:
                raise ValueError(f"no .npy files in folder {path!r}")
            self._lengths = []
            for p in self.paths:
                shape = self._load(p).shape
                if len(shape) != 4:
                    raise ValueError(f"{p!r} holds an array of shape {shape}; expected one video [T, H, W, C]")
                self._lengths.append(shape[0])
        else:
            raise FileNotFoundError(f"{path!r} is neither a .npy file nor a folder")
        if labels_path is not None:
            try:
                labels = np.load(labels_path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise CorruptFileError(labels_path, f"{type(exc).__name__}: {exc}") from exc
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"got {len(self.labels)} labels for {len(self.paths)} videos in {path!r}")

    @staticmethod
    def _load(path: str) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path!r} holds {array.dtype} data; video arrays must be uint8 or floating point")
        return array

    def __len__(self) -> int:
        return len(self.paths)

    def _num_frames(self, index: int) -> int:
        return self._lengths[index]

    def _read(self, index: int, indices: Tensor) -> Tensor:
        video = self._array[index] if self._array is not None else self._load(self.paths[index])
        return torch.from_numpy(np.ascontiguousarray(video[indices.numpy()]))

    def _extra(self, index: int) -> dict[str, Any]:
        return {} if self.labels is None else {"label": int(self.labels[index])}
