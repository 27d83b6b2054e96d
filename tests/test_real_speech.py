"""Real recorded speech: the pyannote.audio sample conversation (fetched by scripts/install.sh)
and Debian's alsa-utils voice prompts read, re-encoded and read back, framed by the frontend,
and a training run on the conversation through the real command line."""

import json
import os

import numpy as np
import pytest
import torch

from anymodal.plugins.audio.data import read_audio
from anymodal.plugins.audio.real_speech import SpeechSampleDataset, alsa_prompts, read_stm, speech_sample_dir
from anymodal.tokenizers.audio import LogMelFrontend
from helpers import anymodal

sf = pytest.importorskip("soundfile")
SAMPLE = os.path.join(speech_sample_dir(), "sample.wav")
needs_sample = pytest.mark.skipif(not os.path.isfile(SAMPLE), reason="the real speech sample is not fetched "
                                  "(bash scripts/install.sh extracts it from the pyannote.audio wheel)")


def speech_frames(wave: torch.Tensor) -> torch.Tensor:
    """Log-mel frames of a waveform ``[T]`` -> ``[F, 128]``."""
    return LogMelFrontend()(wave[None])[0]


@needs_sample
def test_conversation_utterances_carry_transcripts_and_two_speakers():
    ds = SpeechSampleDataset()
    assert len(ds.wave) == 30 * 16000 and len(ds) == 13 and ds.speakers == ["Diane", "Sheila"]
    first = ds[0]
    assert first["text"] == "Hello?" and first["speaker"] == "Diane" and first["label"] == 0
    assert abs(len(first["audio"]) - (7.16 - 6.68) * 16000) <= 1
    # speech is louder than the silence before the first utterance
    assert first["audio"].pow(2).mean() > 10 * ds.wave[:6 * 16000].pow(2).mean()
    assert all(len(s["audio"]) <= 16000 for s in SpeechSampleDataset(max_seconds=1.0))


@needs_sample
@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_real_speech_reencoded_reads_back(tmp_path, fmt, subtype):
    wave = read_audio(SAMPLE)
    path = tmp_path / f"sample.{fmt.lower()}"
    sf.write(path, wave.numpy(), 16000, format=fmt, subtype=subtype)
    back = read_audio(path)
    assert back.shape == wave.shape
    if fmt == "FLAC":  # lossless on 16-bit samples
        assert torch.equal(back, wave)
    else:  # lossy: the spectrogram of the speech survives
        a, b = speech_frames(wave), speech_frames(back)
        assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.95


@pytest.mark.skipif(not alsa_prompts(), reason="alsa-utils is not installed (apt-get install alsa-utils)")
def test_alsa_voice_prompts_resample_from_48k():
    for path in alsa_prompts():
        native, rate = sf.read(path, dtype="float32")
        wave = read_audio(path, 16000)
        assert rate == 48000 and abs(len(wave) - len(native) / 3) <= 1, path
        assert wave.abs().max() > 0.05, path  # a recorded voice, not silence
        assert speech_frames(wave).isfinite().all()


def test_stm_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.stm"
    bad.write_text("sample 1 A 0.5 1.0 hello\nsample 1 B oops\n")
    with pytest.raises(ValueError, match=r"bad.stm:2: not an STM line"):
        read_stm(bad)
    bad.write_text("sample 1 A 2.0 1.0 backwards\n")
    with pytest.raises(ValueError, match=r"bad.stm:1: utterance ends \(1.0\) before it starts \(2.0\)"):
        read_stm(bad)


def test_missing_sample_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch it with: bash scripts/install.sh"):
        SpeechSampleDataset(root=str(tmp_path))


@needs_sample
def test_two_stage_recipe_trains_on_the_real_conversation(tmp_path):
    """Contrastive against the transcripts, then masked distillation: a smoke run on real speech."""
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "modality=audio", "recipe=videoprism", "data.train.name=speech_sample",
             "data.test.name=speech_sample", "data.batch_size=4", "recipe.stages.*.steps=2", "run.log_every=1", "--run-dir", run, timeout=600)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["contrastive"] * 2 + ["distill"] * 2
    assert all(np.isfinite(r["loss"]) for r in records)
