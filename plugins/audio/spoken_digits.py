"""Build the spoken-digits audio set: the words zero..nine said by espeak-ng voices, made harder.

Why synthetic: it needs no download and no licence, builds in seconds, and still has what a
speech probe needs -- ten classes said by many voices, so accuracy on unseen voices measures what
an encoder learned about the words rather than about one speaker.

A voice is an English accent with a voice variant (``en-gb-scotland+f2``), its speed (110-210
words per minute) and pitch (25-75) drawn from the seed. espeak-ng says each digit once per
voice (one call: its start-up is most of the build's time), and that clip becomes ``takes``
different takes. A clean espeak-ng clip would make a linear probe trivially perfect, so each take
is degraded: resampled to 16 kHz with a random tempo change (0.85-1.15; speed and pitch move
together, as in speed perturbation; one soxr call does both), leading and trailing silence
trimmed, placed after a 0-50 ms lead-in, convolved with a synthetic room (exponentially decaying
noise, RT60 0.2-0.8 s, cut where it is 30 dB down, plus the direct path), buried in white or brown
noise at 5-20 dB SNR, scaled to a peak of -40 to -16 dBFS and cut to at most ``max_seconds``.
The quiet levels are those of far-field recordings and keep the FLAC files small: at 16 bits the
noise floor costs most of the bytes, about one bit per sample for every 6 dB of level.

The split is by voice: test voices never say anything in train. Output: ``<split>/<voice>_<word>_<take>.flac``
(16-bit PCM, 16 kHz), ``train.jsonl`` and ``test.jsonl`` (path, label, text, speaker: readable by
:class:`~.audio_data.AudioManifestDataset`) and ``info.json``. The manifests are written last, so a
folder that has them is complete.

Deterministic: each take draws from its own generator seeded by ``(seed, voice, digit, take)``
and espeak-ng itself is deterministic, so the same seed gives byte-identical files (with the same
espeak-ng, libsndfile and soxr versions; ``info.json`` records the espeak-ng version).

    python -m anymodal.plugins.audio.spoken_digits --out DIR [--seed 0] [--small]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

__all__ = ["ACCENTS", "VARIANTS", "SAMPLE_RATE", "FORMAT_VERSION", "ESPEAK_INSTALL_HINT", "Voice", "draw_voices",
           "degrade", "build", "main"]

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6)) + ("croak", "klatt", "whisper")
SAMPLE_RATE = 16000
#: Bump when the recipe changes, so a cache built by an older one can be told apart (``info.json``).
FORMAT_VERSION = 1
ESPEAK_INSTALL_HINT = "apt-get install espeak-ng"

#: Full set: 75 voices (60 train, 15 test) x 10 digits x 5 takes = 3000 + 750 clips of at most 1.5 s.
FULL = {"voices": 75, "takes": 5, "max_seconds": 1.5}
#: The committed copy: 20 voices (15 train, 5 test) x 10 digits x 2 takes = 300 + 100 clips of at most 1 s.
SMALL = {"voices": 20, "takes": 2, "max_seconds": 1.0, "test_fraction": 0.25}


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice: accent + variant, with its own speaking rate and pitch."""
    accent: str
    variant: str
    speed: int  # words per minute
    pitch: int  # espeak-ng's 0-99 scale

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


def draw_voices(count: int, seed: int) -> list[Voice]:
    """``count`` distinct accent+variant voices in a seeded random order, speed and pitch drawn per voice."""
    combos = [(a, v) for a in ACCENTS for v in VARIANTS]
    if not 2 <= count <= len(combos):
        raise ValueError(f"voices must be between 2 and {len(combos)} (accents x variants), got {count}")
    rng = np.random.default_rng([seed, 0x766F696365])
    order = rng.permutation(len(combos))[:count]
    speeds, pitches = rng.integers(110, 211, count), rng.integers(25, 76, count)
    return [Voice(*combos[i], int(s), int(p)) for i, s, p in zip(order, speeds, pitches)]


def espeak_version() -> str:
    """``"1.51"`` from ``espeak-ng --version`` (without its data path, which differs between machines)."""
    text = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"text-to-speech:\s*(\S+)", text)
    return found.group(1) if found else text.strip()


def _speak(voice: Voice, word: str) -> bytes:
    """espeak-ng's WAV bytes (22.05 kHz, 16-bit) for ``word``."""
    cmd = ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", word]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode or len(done.stdout) <= 44:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _trim(x: np.ndarray, rate: int, floor_db: float = -30.0) -> np.ndarray:
    """Cut leading and trailing 10 ms frames whose energy is ``floor_db`` below the loudest frame."""
    hop = rate // 100
    frames = len(x) // hop
    energy = np.square(x[:frames * hop].reshape(frames, hop)).mean(axis=1)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (floor_db / 10))
    if not len(loud):
        return x
    return x[max(loud[0] - 1, 0) * hop:(loud[-1] + 2) * hop]


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def _room(rng: np.random.Generator, rate: int) -> np.ndarray:
    """Impulse response of a synthetic room: the direct path then noise decaying 60 dB over RT60.

    The reverberant part is drawn at -3 to +10 dB direct-to-reverberant ratio, so some rooms are
    clear and some smear the word.
    """
    rt60, drr_db = rng.uniform(0.2, 0.8), rng.uniform(-3.0, 10.0)
    t = np.arange(int(rt60 * rate / 2)) / rate  # to -30 dB: the rest lies under the 5-20 dB SNR noise
    tail = rng.standard_normal(len(t)) * np.exp(-3 * np.log(10) * t / rt60)
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.square(tail).sum())
    tail[0] = 1.0
    return tail


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-power white or brown noise (brown: integrated white, its drift removed)."""
    brown = rng.random() < 0.5
    white = rng.standard_normal(n)
    noise = np.cumsum(white) if brown else white
    if brown:
        noise -= np.linspace(noise[0], noise[-1], n)
    noise -= noise.mean()
    return noise / max(np.sqrt(np.square(noise).mean()), 1e-12)


def degrade(wave: np.ndarray, rate: int, rng: np.random.Generator, max_seconds: float) -> np.ndarray:
    """One clean espeak-ng take -> a 16 kHz int16 clip: tempo, trim, lead-in, room, noise, gain, cut.

    Every random draw comes from ``rng``, so a take's result depends on its generator alone.
    """
    import soxr

    tempo, lead_in = rng.uniform(0.85, 1.15), rng.uniform(0.0, 0.05)
    snr_db, peak_db = rng.uniform(5.0, 20.0), rng.uniform(-40.0, -16.0)
    # playing the clip at `tempo` x its rate, resampled to 16 kHz: speed and pitch change together
    x = soxr.resample(wave.astype(np.float64), rate * tempo, SAMPLE_RATE, "HQ")
    x = np.concatenate([np.zeros(int(lead_in * SAMPLE_RATE)), _trim(x, SAMPLE_RATE)])
    x = _fft_convolve(x, _room(rng, SAMPLE_RATE))[:int(max_seconds * SAMPLE_RATE)]
    power = np.square(x).mean()
    x = x + _noise(rng, len(x)) * np.sqrt(power / 10 ** (snr_db / 10))
    x *= 10 ** (peak_db / 20) / max(np.abs(x).max(), 1e-12)
    return np.round(x * 32767).astype(np.int16)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """Write then rename, so a manifest is either complete or absent."""
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    os.replace(tmp, path)


def build(out: str, seed: int = 0, voices: int = FULL["voices"], takes: int = FULL["takes"],
          max_seconds: float = FULL["max_seconds"], test_fraction: float = 0.2, workers: int = 2) -> dict:
    """Synthesize and write the set under ``out``; returns the ``info.json`` contents.

    Args:
        out: Output folder (created; an earlier build's manifests are removed first, its clips overwritten).
        seed: Everything random follows from it.
        voices: How many distinct voices (at most 105); ``round(test_fraction * voices)`` of them
            (at least one) are the test split.
        takes: Takes per voice and digit.
        max_seconds: Longest clip.
        workers: espeak-ng processes running at once (they run while the previous clips are degraded).
    """
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError(f"building spoken digits needs the espeak-ng program; install it with: {ESPEAK_INSTALL_HINT}")
    if not isinstance(takes, int) or takes < 1:
        raise ValueError(f"takes must be an integer >= 1, got {takes!r}")
    chosen = draw_voices(voices, seed)
    n_test = min(max(1, round(test_fraction * voices)), voices - 1)
    split_of = ["test" if v < n_test else "train" for v in range(voices)]  # the order is already random
    for split in ("train", "test"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        if os.path.exists(os.path.join(out, f"{split}.jsonl")):  # not a complete build until the new ones are written
            os.remove(os.path.join(out, f"{split}.jsonl"))
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    jobs = [(v, digit) for v in range(voices) for digit in range(10)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # threads suffice: espeak-ng runs in its own process
        spoken = pool.map(lambda job: _speak(chosen[job[0]], DIGIT_WORDS[job[1]]), jobs)
        for (v, digit), wav in zip(jobs, spoken):
            voice, word = chosen[v], DIGIT_WORDS[digit]
            wave, rate = sf.read(io.BytesIO(wav), dtype="float64")
            for take in range(takes):
                clip = degrade(wave, rate, np.random.default_rng([seed, v, digit, take]), max_seconds)
                rel = f"{split_of[v]}/{voice.name}_{word}_{take}.flac"
                encoded = io.BytesIO()  # encoded in memory, written at once: libsndfile's many small writes are slow
                sf.write(encoded, clip, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
                with open(os.path.join(out, rel), "wb") as fh:
                    fh.write(encoded.getvalue())
                rows[split_of[v]].append({"path": rel, "label": digit, "text": f"a spoken {word}", "speaker": voice.name})
    info = {"format_version": FORMAT_VERSION, "seed": seed, "sample_rate": SAMPLE_RATE, "max_seconds": max_seconds,
            "takes": takes, "espeak_ng": espeak_version(),
            "voices": {s: sorted(chosen[v].name for v in range(voices) if split_of[v] == s) for s in ("train", "test")},
            "clips": {s: len(r) for s, r in rows.items()}}
    with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
        fh.write("\n")
    for split, split_rows in rows.items():
        _write_jsonl(os.path.join(out, f"{split}.jsonl"), split_rows)
    info["seconds"] = time.perf_counter() - start
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anymodal.plugins.audio.spoken_digits",
                                     description="Synthesize the spoken-digits audio set with espeak-ng.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="the small committed copy (300 + 100 clips of 1 s)")
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at once")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        info = build(os.path.expanduser(args.out), seed=args.seed, workers=args.workers, **(SMALL if args.small else FULL))
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"spoken digits: {info['clips']['train']} train + {info['clips']['test']} test clips in {args.out} "
              f"({info['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
