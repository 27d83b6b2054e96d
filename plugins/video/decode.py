"""Video files through PyAV (``pip install av``; its wheel bundles FFmpeg), imported only when a file
is opened: the header's frame count and size, the frames a clip needs, a whole-file check."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from ...core.args import int_arg
from ...core.errors import CorruptFileError

__all__ = ["VideoInfo", "probe_video", "decode_video", "verify_video"]


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
    if indices is not None and max_frames is not None:
        raise ValueError("decode_video takes indices or max_frames, not both")
    wanted = None if indices is None else [int(i) for i in indices]
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise ValueError(f"decode_video needs non-empty, non-negative frame indices, got {wanted}")
    if max_frames is not None:
        int_arg("max_frames", max_frames, 1)
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"decode_video returns uint8 or floating-point frames, got dtype {dtype}")
    stop = max(wanted) + 1 if wanted is not None else max_frames
    frames, count, latest = _decode_frames(path, stop, None if wanted is None else set(wanted))
    if wanted is None:
        order: Sequence[int] = range(count)
    else:
        if count - 1 not in frames:  # indices past the end show the last frame
            frames[count - 1] = latest.to_ndarray(format="rgb24")
        order = [min(i, count - 1) for i in wanted]
    video = torch.from_numpy(np.stack([frames[i] for i in order]))
    return video if dtype == torch.uint8 else video.to(dtype).div_(255.0)


def verify_video(path: str) -> int:
    """Decode every frame of a video file (keeping none) and return how many there are.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CorruptFileError: As :func:`decode_video` does, for a file that does not decode whole.
    """
    return _decode_frames(path, None, set())[1]


def _decode_frames(path: str, stop: int | None, keep: set[int] | None) -> tuple[dict[int, np.ndarray], int, Any]:
    """Decode from the start up to frame ``stop`` (None: all): the frames in ``keep`` (None: all)
    as RGB arrays, the number decoded and the last decoded frame."""
    av = _av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
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
    return frames, count, latest
