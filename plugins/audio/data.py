"""Audio files: a checked reader, a manifest dataset and the spoken digits.

Samples are ``{"audio": FloatTensor[T], "label": int, "text": str}`` (label and caption where
known): mono, 16 kHz by default, in [-1, 1]. ``T`` varies from clip to clip; the collate pads it
and adds ``audio_padding``.

Files are read through ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis and the other formats it
knows) and resampled with ``soxr``; both are imported only when a file is read.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...core.args import float_arg, int_arg
from ...core.data import cache_dir, report_skipped
from ...core.errors import CorruptFileError, DataError

__all__ = ["AUDIO_INSTALL_HINT", "read_audio", "AudioManifestDataset", "SpokenDigitsDataset", "spoken_digits_dir", "SMALL_SPOKEN_DIGITS"]

logger = logging.getLogger(__name__)

AUDIO_INSTALL_HINT = "pip install soundfile soxr"
#: The small spoken-digits copy committed with the package (300 train + 100 test clips of at most 1 s).
SMALL_SPOKEN_DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spoken_digits_small")

_SPLITS = ("train", "test")
_MANIFEST_ENDINGS = (".csv", ".jsonl", ".ndjson")
# Sizes a streaming writer leaves in a WAV header it cannot go back to fix (espeak-ng --stdout
# writes 0x7ffff000, others 0 or 0xffffffff): libsndfile then reads to the end of the file.
_WAV_PLACEHOLDER_SIZES = 0x7FFF0000


def _soundfile():
    try:
        import soundfile
    except (ModuleNotFoundError, OSError) as exc:  # OSError: the package is there, libsndfile is not
        raise ImportError(f"reading audio files needs soundfile and soxr; install them with: {AUDIO_INSTALL_HINT}") from exc
    return soundfile


def _soxr():
    try:
        import soxr
    except ModuleNotFoundError as exc:
        raise ImportError(f"resampling audio needs soxr; install it with: {AUDIO_INSTALL_HINT}") from exc
    return soxr


def _wav_data_shortfall(path: str) -> str | None:
    """For a RIFF/WAVE file: why its ``data`` chunk is cut short, or None if it is whole (or not a WAV).

    libsndfile trusts the file rather than the header: a WAV cut anywhere after its header reads
    without an error, just shorter. Only the header's ``data`` size tells that samples are missing.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        order = "little" if head[:4] == b"RIFF" else "big"
        size = os.fstat(fh.fileno()).st_size
        offset = 12
        while offset + 8 <= size:
            fh.seek(offset)
            chunk = fh.read(8)
            declared = int.from_bytes(chunk[4:], order)
            if chunk[:4] == b"data":
                have = size - offset - 8
                if 0 < declared < _WAV_PLACEHOLDER_SIZES and have < declared:
                    return f"truncated: the WAV header declares {declared} bytes of samples, the file holds {have}"
                return None
            offset += 8 + declared + (declared & 1)  # chunks are padded to an even size
    return None  # no data chunk: libsndfile reports that itself


def read_audio(path: str, sample_rate: int = 16000) -> Tensor:
    """Read an audio file as a mono float32 waveform ``[T]`` in [-1, 1] at ``sample_rate``.

    Channels are averaged; a file at another rate is resampled with soxr's high-quality filter;
    values beyond [-1, 1] (float files, resampling overshoot) are clipped.

    Every way a file can be broken raises :class:`CorruptFileError` naming the file and what is
    wrong: libsndfile cannot open or decode it (unknown format, bad header, a truncated FLAC
    "loses sync", a truncated OGG is "malformed"), it holds no samples, holds NaN or infinite
    values, or it is a truncated WAV. libsndfile reads a WAV whose data was cut short without
    complaint -- it shortens the clip to what is there and reports that length as the file's --
    so the RIFF header's ``data`` chunk size is checked against the bytes present; and for any
    format, fewer frames read than the file's header reports is reported as truncation.
    """
    sample_rate = int_arg("sample_rate", sample_rate, 1)
    sf = _soundfile()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file {path!r} does not exist")
    shortfall = _wav_data_shortfall(path)
    if shortfall:
        raise CorruptFileError(path, shortfall)
    try:
        with sf.SoundFile(path) as fh:
            declared, rate = fh.frames, fh.samplerate
            wave = fh.read(dtype="float32", always_2d=True)
    except (getattr(sf, "SoundFileError", RuntimeError), RuntimeError, ValueError, TypeError) as exc:
        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}") from exc
    if len(wave) < declared:
        raise CorruptFileError(path, f"truncated: the header declares {declared} frames, only {len(wave)} could be read")
    if len(wave) == 0:
        raise CorruptFileError(path, f"no audio samples (an empty or truncated file of {os.path.getsize(path)} bytes)")
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise CorruptFileError(path, f"{bad} of {wave.size} samples are NaN or infinite")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if rate != sample_rate:
        mono = _soxr().resample(mono, rate, sample_rate, "HQ")
    return torch.from_numpy(np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False))


# --------------------------------------------------------------------------------------------
# datasets


def _manifest_file(manifest: str, split: str | None) -> str:
    """``manifest`` itself, or for a folder its ``<split>.csv`` / ``<split>.jsonl``."""
    if not os.path.isdir(manifest):
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"audio manifest {manifest!r} does not exist")
        return manifest
    if split is None:
        raise DataError(f"audio manifest {manifest!r} is a folder: name the split whose <split>.csv or <split>.jsonl to read")
    for ending in _MANIFEST_ENDINGS:
        path = os.path.join(manifest, split + ending)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no manifest for split {split!r} in folder {manifest!r} (looked for "
                            f"{', '.join(split + e for e in _MANIFEST_ENDINGS)})")


def _manifest_rows(manifest: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``(line number, record)`` pairs of a CSV or JSONL manifest, and the fields its first record has."""
    ext = os.path.splitext(manifest)[1].lower()
    if ext not in _MANIFEST_ENDINGS:
        raise DataError(f"manifest {manifest!r}: unknown ending {ext!r}; a manifest is .csv (with a header) or .jsonl")
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            return _csv_rows(manifest, fh) if ext == ".csv" else _jsonl_rows(manifest, fh)
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {manifest!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def _csv_rows(manifest: str, fh: Any) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    reader = csv.DictReader(fh)
    try:
        fields = [f.strip() for f in reader.fieldnames or []]
        rows = [(reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}) for row in reader]
    except csv.Error as exc:
        raise DataError(f"manifest {manifest!r}, line {reader.line_num}: not CSV ({exc})") from exc
    return rows, fields


def _jsonl_rows(manifest: str, fh: Any) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    rows = []
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest {manifest!r}, line {number}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DataError(f"manifest {manifest!r}, line {number}: expected a JSON object, got {type(record).__name__}")
        rows.append((number, record))
    return rows, list(rows[0][1]) if rows else []


def _label(manifest: str, line: int, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"manifest {manifest!r}, line {line}, field 'label': {value!r} is not an integer >= 0")
    return value


class AudioManifestDataset(Dataset):
    """Clips listed in a manifest: CSV with a header, or JSONL (one object per line).

    Fields: ``path`` (required; relative paths resolve against ``root``, else the manifest's
    folder), ``text`` or ``caption`` (optional), ``label`` (optional integer >= 0), and any of
    ``extra_fields`` (copied as strings). An optional field is taken when the header (CSV) or the
    first record (JSONL) has it, and then every line must give it. A line that lacks a field or
    names a missing file raises an error naming the manifest, line and field.

    With ``verify`` every file is read while the manifest is scanned, so a corrupt one is reported
    up front: it is skipped and listed in :attr:`skipped` (one logged warning with the count and
    the first names), or with ``strict`` it raises :class:`CorruptFileError`. A file that fails
    later raises it naming the file.

    Args:
        manifest: ``.csv`` or ``.jsonl`` file, or a folder of them named by split
            (``train.jsonl``, ``test.csv``, ...).
        split: With a folder, the manifest ``<split>.csv`` or ``<split>.jsonl`` in it is read;
            a manifest file is read whatever the split.
        root: Folder that relative paths are under (default: the manifest's folder).
        sample_rate: Rate clips are resampled to.
        max_seconds: Keep at most the first this many seconds of each clip (random crops are
            :class:`RandomCropAudio`'s job).
        strict: Raise on the first corrupt file instead of skipping it.
        verify: Read every file while scanning (cost: one pass over the data).
        extra_fields: Other string fields to copy into samples (e.g. ``["speaker"]``).
    """

    def __init__(self, manifest: str, split: str | None = None, root: str | None = None, sample_rate: int = 16000,
                 max_seconds: float | None = None, strict: bool = False, verify: bool = True,
                 extra_fields: Sequence[str] = ()) -> None:
        self.sample_rate = int_arg("sample_rate", sample_rate, 1)
        self.max_samples = None
        if max_seconds is not None:
            if float_arg("max_seconds", max_seconds) <= 0:
                raise DataError(f"max_seconds must be > 0 or None, got {max_seconds}")
            self.max_samples = max(1, round(max_seconds * self.sample_rate))
        self.manifest = _manifest_file(os.fspath(manifest), split)
        base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.manifest))
        rows, fields = _manifest_rows(self.manifest)
        if "path" not in fields:
            where = "line 1 (the header)" if self.manifest.lower().endswith(".csv") else f"line {rows[0][0] if rows else 1}"
            raise DataError(f"manifest {self.manifest!r}, {where}: no field 'path' (it has {fields}); "
                            "every line needs the audio file's path")
        text_field = next((f for f in ("text", "caption") if f in fields), None)
        wanted = ["path"] + ["label"] * ("label" in fields) + [text_field] * (text_field is not None) + list(extra_fields)
        self.samples: list[dict[str, Any]] = []
        self.skipped: list[tuple[str, str]] = []
        for line, record in rows:
            for field in wanted:
                value = record.get(field)
                if value is None or (isinstance(value, str) and not value.strip() and field != text_field):
                    raise DataError(f"manifest {self.manifest!r}, line {line}: field {field!r} is missing or empty")
            path = os.path.join(base, os.path.expanduser(str(record["path"]).strip()))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"manifest {self.manifest!r}, line {line}, field 'path': file {path!r} does not exist")
            entry: dict[str, Any] = {"path": path}
            if "label" in fields:
                entry["label"] = _label(self.manifest, line, record["label"])
            if text_field is not None:
                entry["text"] = str(record[text_field])
            entry.update((f, str(record[f])) for f in extra_fields)
            try:
                if verify:
                    read_audio(path, self.sample_rate)
                self.samples.append(entry)
            except CorruptFileError as exc:
                if strict:
                    raise
                self.skipped.append((path, exc.reason))
        report_skipped(self.skipped, self.manifest, "audio file")
        if not self.samples:
            raise DataError(f"manifest {self.manifest!r} lists no readable audio files"
                             + (f" ({len(self.skipped)} skipped as corrupt)" if self.skipped else ""))
        self.labels = np.array([s["label"] for s in self.samples], dtype=np.int64) if "label" in fields else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.samples[index]
        audio = read_audio(entry["path"], self.sample_rate)
        if self.max_samples is not None:
            audio = audio[:self.max_samples]
        return {"audio": audio, **{k: v for k, v in entry.items() if k != "path"}}


def spoken_digits_dir() -> str:
    """Where ``scripts/install.sh`` builds the full spoken digits: ``<cache>/audio/spoken_digits``.

    ``<cache>`` is ``$ANYMODAL_CACHE``, else ``$XDG_CACHE_HOME/anymodal``, else ``~/.cache/anymodal``.
    """
    return cache_dir("audio", "spoken_digits")


def _built(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f"{split}.jsonl")) for split in _SPLITS)


_warned_small = False


class SpokenDigitsDataset(AudioManifestDataset):
    """The words zero..nine said by espeak-ng voices in noisy rooms (:mod:`.spoken_digits`).

    Samples: ``{"audio": FloatTensor[T] at 16 kHz, "label": digit, "text": "a spoken seven",
    "speaker": voice}``. Train and test voices are disjoint, so test accuracy is on unseen voices.

    Reads the full set (3000 train + 750 test clips of at most 1.5 s) from ``root``, by default
    :func:`spoken_digits_dir`, where ``scripts/install.sh`` builds it when espeak-ng is installed.
    Without it, and without a ``root``, the small copy shipped with anymodal is read (300 + 100
    clips of at most 1 s; a warning says so once).

    Args:
        split: ``"train"`` or ``"test"``.
        root: Folder of a build (``train.jsonl``, ``test.jsonl`` and the clips).
        max_seconds: Keep at most the first this many seconds of each clip.
        verify: Read every clip while loading (the files are generated, so off by default).
    """

    def __init__(self, split: str = "train", root: str | None = None, max_seconds: float | None = None,
                 verify: bool = False) -> None:
        global _warned_small
        if split not in _SPLITS:
            raise DataError(f"unknown spoken digits split {split!r}; valid splits: {list(_SPLITS)}")
        build = f"python -m anymodal.plugins.audio.spoken_digits --out {root or spoken_digits_dir()}"
        if root is not None:
            if not _built(os.fspath(root)):
                raise FileNotFoundError(f"no spoken digits build in {os.fspath(root)!r} (train.jsonl and test.jsonl); "
                                        f"build it with: {build} (needs espeak-ng: apt-get install espeak-ng)")
            folder = os.fspath(root)
        elif _built(spoken_digits_dir()):
            folder = spoken_digits_dir()
        elif _built(SMALL_SPOKEN_DIGITS):
            folder = SMALL_SPOKEN_DIGITS
            if not _warned_small:
                _warned_small = True
                logger.warning("the full spoken digits set is not in %s; reading the small copy shipped with anymodal "
                               "(300 + 100 clips). Build the full set with: %s", spoken_digits_dir(), build)
        else:
            raise FileNotFoundError(f"spoken digits are neither in {spoken_digits_dir()!r} nor in the small copy "
                                    f"{SMALL_SPOKEN_DIGITS!r}; build them with: {build} (needs espeak-ng: "
                                    "apt-get install espeak-ng)")
        self.root, self.split = folder, split
        super().__init__(os.path.join(folder, f"{split}.jsonl"), sample_rate=16000, max_seconds=max_seconds,
                         strict=True, verify=verify, extra_fields=("speaker",))
