"""Audio data: the reader on WAV/FLAC/OGG files written here (resampling, mono, broken files), the
manifest dataset, the waveform transforms, the spoken-digits build (where espeak-ng is installed)
and the small spoken-digits copy shipped with anymodal."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile", reason="audio tests need soundfile (pip install soundfile soxr)")
pytest.importorskip("soxr", reason="audio tests need soxr (pip install soundfile soxr)")

from anymodal.core.data import AugmentedDataset, collate  # noqa: E402
from anymodal.plugins.audio import data as A  # noqa: E402
from anymodal.plugins.audio import transforms as AT  # noqa: E402
from anymodal.core.errors import CorruptFileError  # noqa: E402
from anymodal.plugins.image.data import DIGIT_WORDS  # noqa: E402
from anymodal.plugins.manager import load_components  # noqa: E402

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not on PATH (apt-get install espeak-ng)")

FORMATS = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}


def _sine(path, rate=44100, seconds=1.0, freq=440.0, fmt="wav"):
    """A stereo sine (the right channel at half amplitude) written with soundfile."""
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), np.stack([wave, 0.5 * wave], 1), rate, subtype=FORMATS[fmt])
    return str(path)


def _peak_hz(x: torch.Tensor, rate: int = 16000) -> float:
    spectrum = torch.fft.rfft(x.double()).abs()
    return float(spectrum.argmax()) * rate / len(x)


@pytest.mark.parametrize("fmt,rate", [("wav", 44100), ("flac", 22050), ("ogg", 44100)])
def test_read_audio_resamples_to_16k_mono_and_keeps_the_pitch(tmp_path, fmt, rate):
    path = _sine(tmp_path / f"tone.{fmt}", rate=rate, fmt=fmt)
    x = A.read_audio(path)
    assert x.dtype == torch.float32 and x.dim() == 1
    assert abs(len(x) - 16000) <= 1
    assert abs(_peak_hz(x) - 440.0) <= 1.0
    assert x.abs().max() <= 1.0
    # mono is the mean of the channels: amplitude (0.5 + 0.25) / 2, give or take the codec and the filter
    assert 0.35 < float(x[2000:-2000].abs().max()) < 0.40


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("keep", ["half", "all but 5 bytes"])
def test_truncated_file_is_corrupt_naming_the_file(tmp_path, fmt, keep):
    raw = open(_sine(tmp_path / f"whole.{fmt}", fmt=fmt), "rb").read()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(raw[:len(raw) // 2] if keep == "half" else raw[:-5])
    with pytest.raises(CorruptFileError) as info:
        A.read_audio(str(cut))
    assert info.value.path == str(cut) and str(cut) in str(info.value)
    if fmt == "wav":  # libsndfile itself reads it without complaint, just shorter
        assert sf.info(str(cut)).frames < 44100 and "truncated" in info.value.reason


def test_streamed_wav_placeholder_size_is_not_truncation(tmp_path):
    """Writers that cannot seek back (espeak-ng --stdout) leave 0x7ffff000 as the data size."""
    path = _sine(tmp_path / "tone.wav", rate=16000, seconds=0.5)
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"data") + 4
    raw[at:at + 4] = (0x7FFFF000).to_bytes(4, "little")
    (tmp_path / "streamed.wav").write_bytes(bytes(raw))
    assert len(A.read_audio(str(tmp_path / "streamed.wav"))) == 8000


def test_empty_garbage_and_non_finite_files_are_corrupt(tmp_path):
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    (tmp_path / "zero_bytes.flac").write_bytes(b"")
    (tmp_path / "text.ogg").write_bytes(b"not audio at all" * 8)
    nan = np.full((100, 1), 0.1, np.float32)
    nan[10] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    reasons = {}
    for name in ("empty.wav", "zero_bytes.flac", "text.ogg", "nan.wav"):
        with pytest.raises(CorruptFileError, match=name) as info:
            A.read_audio(str(tmp_path / name))
        reasons[name] = info.value.reason
    assert "no audio samples" in reasons["empty.wav"] and "NaN" in reasons["nan.wav"]
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        A.read_audio(str(tmp_path / "missing.wav"))


# --------------------------------------------------------------------------------------------
# manifests


def _clips(folder, n=3):
    os.makedirs(folder, exist_ok=True)
    return [_sine(os.path.join(folder, f"c{i}.wav"), rate=16000, seconds=0.25 + 0.25 * i, freq=300 + 100 * i) for i in range(n)]


def test_csv_and_jsonl_manifests_resolve_relative_paths(tmp_path):
    _clips(tmp_path / "clips")
    (tmp_path / "m.csv").write_text("path,caption,label\nclips/c0.wav,a low tone,0\nclips/c1.wav,\"a tone, higher\",1\n"
                                    "clips/c2.wav,the highest,2\n")
    with open(tmp_path / "m.jsonl", "w") as fh:
        for i in range(3):
            fh.write(json.dumps({"path": f"clips/c{i}.wav", "text": f"tone {i}", "label": i}) + "\n")
    for name in ("m.csv", "m.jsonl"):
        ds = A.AudioManifestDataset(str(tmp_path / name), max_seconds=0.5)
        assert len(ds) == 3 and list(ds.labels) == [0, 1, 2] and ds.skipped == []
        sample = ds[1]
        assert set(sample) == {"audio", "label", "text"} and sample["label"] == 1
        assert len(ds[0]["audio"]) == 4000 and len(ds[2]["audio"]) == 8000  # 0.75 s cut to max_seconds
    assert A.AudioManifestDataset(str(tmp_path / "m.csv"))[1]["text"] == "a tone, higher"
    batch = collate([ds[0], ds[2]])
    assert batch["audio"].shape == (2, 8000) and batch["audio_padding"][0].sum() == 4000
    # paths under another root, no label or caption
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "plain.csv").write_text("path\nc0.wav\n")
    plain = A.AudioManifestDataset(str(tmp_path / "other" / "plain.csv"), root=str(tmp_path / "clips"))
    assert set(plain[0]) == {"audio"} and plain.labels is None


@pytest.mark.parametrize("name,text,error,match", [
    ("nopath.csv", "file,label\nc0.wav,0\n", ValueError, r"nopath\.csv.*line 1.*'path'"),
    ("nolabel.jsonl", '{"path": "c0.wav", "label": 0}\n{"path": "c1.wav"}\n', ValueError, r"nolabel\.jsonl.*line 2.*'label'"),
    ("badlabel.csv", "path,label\nc0.wav,0\nc1.wav,one\n", ValueError, r"badlabel\.csv.*line 3.*'label'.*'one'"),
    ("gone.csv", "path\nc0.wav\nnot_there.wav\n", FileNotFoundError, r"gone\.csv.*line 3.*'path'.*not_there\.wav"),
    ("m.txt", "c0.wav\n", ValueError, "csv.*jsonl"),
])
def test_manifest_errors_name_manifest_line_and_field(tmp_path, name, text, error, match):
    _clips(tmp_path, 2)
    (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        A.AudioManifestDataset(str(tmp_path / name))


def test_manifest_skips_and_counts_corrupt_files_unless_strict(tmp_path, caplog):
    _clips(tmp_path, 2)
    raw = open(tmp_path / "c1.wav", "rb").read()
    (tmp_path / "cut.wav").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "m.csv").write_text("path,label\nc0.wav,0\ncut.wav,1\nc1.wav,1\n")
    with caplog.at_level("WARNING"):
        ds = A.AudioManifestDataset(str(tmp_path / "m.csv"))
    assert len(ds) == 2 and [p for p, _ in ds.skipped] == [str(tmp_path / "cut.wav")]
    assert "skipped 1" in caplog.text and "cut.wav" in caplog.text
    with pytest.raises(CorruptFileError, match="cut.wav"):
        A.AudioManifestDataset(str(tmp_path / "m.csv"), strict=True)


# --------------------------------------------------------------------------------------------
# transforms


def _noise(n=16000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1


ALL_TRANSFORMS = [AT.RandomCropAudio(0.5), AT.RandomGain(), AT.TimeMask(), AT.FreqMask(), AT.AddNoise()]


@pytest.mark.parametrize("transform", ALL_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_transforms_are_reproducible_from_the_generator(transform):
    x = _noise()
    a = transform(x, torch.Generator().manual_seed(3))
    b = transform(x, torch.Generator().manual_seed(3))
    c = transform(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == x.dtype
    with pytest.raises(ValueError, match=type(transform).__name__):
        transform(x[None], torch.Generator())


def test_crop_and_gain_do_what_they_say():
    x = _noise()
    crop = AT.RandomCropAudio(0.25)
    out = crop(x, torch.Generator().manual_seed(0))
    start = int((x == out[0]).nonzero()[0])
    assert len(out) == 4000 and torch.equal(out, x[start:start + 4000])
    short = x[:1000]
    assert torch.equal(crop(short, torch.Generator()), short)
    gain = AT.RandomGain(db=(-12, -12))(x, torch.Generator())
    assert torch.allclose(20 * torch.log10(gain.abs().max() / x.abs().max()), torch.tensor(-12.0), atol=1e-4)
    g = torch.Generator().manual_seed(5)
    ratio = AT.RandomGain(db=(-6, 6))(x, g) / x
    assert torch.allclose(ratio, ratio[0]) and 10 ** (-6 / 20) <= float(ratio[0]) <= 10 ** (6 / 20)


def test_time_mask_zeroes_spans_and_nothing_else():
    x = _noise() + 1.0  # no zeros of its own
    out = AT.TimeMask(max_fraction=0.1, count=2)(x, torch.Generator().manual_seed(1))
    zero = out == 0
    assert 0 < int(zero.sum()) <= 2 * 1600 and torch.equal(out[~zero], x[~zero])
    runs = int((zero[1:] & ~zero[:-1]).sum()) + int(zero[0])
    assert 1 <= runs <= 2
    assert torch.equal(AT.TimeMask(count=0)(x, torch.Generator()), x)


def test_freq_mask_removes_one_band():
    x = _noise(seed=2)
    mask = AT.FreqMask(max_fraction=0.2, count=1)
    (low, high), = mask.bands(torch.Generator().manual_seed(7)).tolist()
    out = mask(x, torch.Generator().manual_seed(7))
    freq = torch.arange(8001) * 1.0  # 1 Hz bins for a 1 s clip
    before, after = torch.fft.rfft(x.double()).abs(), torch.fft.rfft(out.double()).abs()
    inside = (freq >= low) & (freq < high)
    assert high - low > 5 and inside.sum() > 5
    assert float(after[inside].max()) < 1e-3 * float(before[inside].mean())
    assert torch.allclose(after[~inside], before[~inside], rtol=1e-3, atol=1e-3)


def test_add_noise_reaches_the_snr():
    x = torch.sin(torch.arange(16000) * 0.1) * 0.3
    out = AT.AddNoise(snr_db=(20, 20))(x, torch.Generator().manual_seed(0))
    snr = 10 * torch.log10(x.square().mean() / (out - x).square().mean())
    assert abs(float(snr) - 20.0) < 0.3


def test_registered_by_name_and_built_from_config_values():
    comps = load_components(autoload=False)
    assert {"random_crop_audio", "random_gain", "time_mask", "freq_mask", "add_noise"} <= set(comps.transform.names())
    assert {"audio_manifest", "spoken_digits"} <= set(comps.dataset.names())
    noise = comps.transform.build("add_noise", snr_db=[10, 20])
    assert isinstance(noise, AT.AddNoise) and noise.snr_db == (10.0, 20.0)
    with pytest.raises(ValueError, match="snr_db"):
        AT.AddNoise(snr_db=(30, 10))
    with pytest.raises(ValueError, match="max_fraction"):
        AT.TimeMask(max_fraction=1.5)


# --------------------------------------------------------------------------------------------
# spoken digits


def test_small_copy_loads_with_every_digit_in_both_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYMODAL_CACHE", str(tmp_path / "empty_cache"))  # no full build: the shipped copy is read
    train, test = A.SpokenDigitsDataset("train"), A.SpokenDigitsDataset("test")
    assert train.root == A.SMALL_SPOKEN_DIGITS
    assert (len(train), len(test)) == (300, 100)
    assert set(train.labels) == set(test.labels) == set(range(10))
    assert not {s["speaker"] for s in train.samples} & {s["speaker"] for s in test.samples}
    sample = test[7]
    assert sample["audio"].dtype == torch.float32 and 4000 < len(sample["audio"]) <= 16000
    assert sample["text"].startswith("a spoken ") and sample["text"].endswith(DIGIT_WORDS[sample["label"]])
    aug = AugmentedDataset(train, [AT.RandomCropAudio(0.5), AT.RandomGain(), AT.TimeMask()], key="audio", seed=0, views=2)
    batch = collate([aug[i, 0] for i in range(4)])
    assert torch.equal(collate([aug[i, 0] for i in range(4)])["audio"], batch["audio"])
    assert batch["audio"].shape[1] <= 8000 and len(batch["speaker"]) == 4
    with pytest.raises(FileNotFoundError, match="spoken_digits --out"):
        A.SpokenDigitsDataset("train", root=str(tmp_path))


@needs_espeak
def test_build_is_deterministic_and_splits_by_voice(tmp_path):
    from anymodal.plugins.audio.spoken_digits import build

    for out in ("a", "b"):
        build(str(tmp_path / out), seed=3, voices=2, takes=1, max_seconds=1.0, workers=2 if out == "a" else 1)
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".flac"]) == 20
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    rows = {s: [json.loads(line) for line in open(a / f"{s}.jsonl")] for s in ("train", "test")}
    speakers = {s: {r["speaker"] for r in rows[s]} for s in rows}
    assert len(speakers["train"]) == len(speakers["test"]) == 1 and not speakers["train"] & speakers["test"]
    assert sorted(r["label"] for r in rows["test"]) == list(range(10))
    info = sf.info(str(a / rows["test"][0]["path"]))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
    assert info.frames <= 16000
    ds = A.SpokenDigitsDataset("train", root=str(a), verify=True)
    assert len(ds) == 10 and ds[3]["label"] == 3 and ds[3]["text"] == "a spoken three"
    other = build(str(tmp_path / "c"), seed=4, voices=2, takes=1, max_seconds=1.0)
    assert other["voices"] != json.load(open(a / "info.json"))["voices"]  # another seed, other voices
