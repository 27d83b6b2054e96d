"""Audio frontend and tokenizers: Kaldi fbank against an independent float64 reference (and
torchaudio where it imports), patch round trips, ragged batches against clips encoded alone."""

import math

import numpy as np
import pytest
import torch

from anymodal.core.backbone import Backbone
from anymodal.core.data import collate
from anymodal.core.encoder import Encoder
from anymodal.core.posenc import build_posenc
from anymodal.tokenizers.audio import LogMelFrontend, SpectrogramFrameTokenizer, SpectrogramPatchTokenizer


def reference_fbank(wave: np.ndarray, sr=16000, n_mels=128, win=400, hop=160, preemph=0.97, low=20.0) -> np.ndarray:
    """Kaldi's fbank as its documentation describes it, one frame at a time in float64."""
    n_fft = 512
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(sr / 2)
    delta = (hi - lo) / (n_mels + 1)
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        for k in range(n_fft // 2):
            f = mel(k * sr / n_fft)
            if left < f < right:
                bank[m, k] = (f - left) / (centre - left) if f <= centre else (right - f) / (right - centre)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1)) for i in range(win)])
    out = []
    for start in range(0, len(wave) - win + 1, hop):
        frame = wave[start:start + win].astype(np.float64)
        frame = frame - frame.mean()
        emphasized = np.empty_like(frame)
        emphasized[0] = frame[0] - preemph * frame[0]
        emphasized[1:] = frame[1:] - preemph * frame[:-1]
        spectrum = np.abs(np.fft.rfft(emphasized * window, n=n_fft)) ** 2
        out.append(np.log(np.maximum(bank @ spectrum, np.finfo(np.float32).eps)))
    return np.array(out)


def speech_like(seconds=1.0, seed=0, sr=16000) -> torch.Tensor:
    """A chirp with harmonics and noise: energy across the mel range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 80 * t
    wave = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 12))
    return 0.2 * wave + 0.01 * torch.randn(len(t), generator=g)


def test_frontend_matches_an_independent_float64_reference():
    wave = speech_like(0.5)
    ours = LogMelFrontend()(wave[None])[0].double().numpy()
    ref = reference_fbank(wave.double().numpy())
    assert ours.shape == ref.shape == (1 + (8000 - 400) // 160, 128)
    loud = ref > np.log(1e-3)  # float32 rounding matters only in bins with next to no energy
    assert np.abs(ours - ref)[loud].max() < 1e-3
    assert np.abs(ours - ref).mean() < 1e-3


def test_frontend_matches_torchaudio_kaldi_fbank_where_it_imports():
    try:
        from torchaudio.compliance import kaldi
    except Exception as e:  # torchaudio is optional; on this machine it may be built for another torch
        pytest.skip(f"torchaudio does not import here ({type(e).__name__}: {str(e)[:120]})")
    wave = speech_like(0.5)
    theirs = kaldi.fbank(wave[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                         num_mel_bins=128, dither=0.0, frame_shift=10)
    ours = LogMelFrontend()(wave[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_frontend_batches_without_a_loop_and_rejects_bad_shapes():
    waves = torch.stack([speech_like(0.3, seed=s) for s in range(3)])
    batch = LogMelFrontend()(waves)
    alone = torch.stack([LogMelFrontend()(w[None])[0] for w in waves])
    torch.testing.assert_close(batch, alone)
    with pytest.raises(ValueError, match=r"mono waveforms \[B, T\]"):
        LogMelFrontend()(waves[:, None])
    with pytest.raises(ValueError, match="shorter than one 400-sample window"):
        LogMelFrontend()(torch.zeros(1, 100))


def test_patch_round_trip_and_frame_targets():
    tok = SpectrogramPatchTokenizer(32, norm_targets=False, max_seconds=1.0)
    wave = speech_like(1.0)[None]
    spec, counts = tok.spectrogram(wave, None)
    patches = tok.patches(spec)
    gt, gf = spec.shape[1] // 16, 128 // 16
    rebuilt = patches.reshape(1, gt, gf, 16, 16).permute(0, 1, 3, 2, 4).reshape(spec.shape)
    assert torch.equal(rebuilt, spec) and counts.tolist() == [gt]
    tokens = tok(wave)
    assert torch.equal(tokens.targets, patches)
    assert tokens.pos[0, 9].tolist() == [1, 1]  # (time patch, mel patch), row-major
    frames = SpectrogramFrameTokenizer(32, frames_per_token=4, norm_targets=False)(wave)
    assert torch.equal(frames.targets.reshape(1, -1, 128), spec[:, :frames.targets.shape[1] * 4])
    assert frames.pos.shape[-1] == 1


def test_fixed_frames_crop_and_pad():
    tok = SpectrogramPatchTokenizer(32, frames=64)
    short, long = tok(speech_like(0.3)[None]), tok(speech_like(1.2)[None])
    assert short.x.shape[1] == long.x.shape[1] == 4 * 8 and short.padding is None and long.padding is None
    with pytest.raises(ValueError, match="multiple of the patch's time size"):
        SpectrogramPatchTokenizer(32, frames=50)


@pytest.mark.parametrize("kind", [SpectrogramPatchTokenizer, SpectrogramFrameTokenizer])
def test_ragged_batch_equals_each_clip_alone(kind):
    torch.manual_seed(0)
    tok = kind(32, max_seconds=2.0)
    student = Backbone(tok, Encoder(32, 2, 2, build_posenc("sincos", 32, tok.pos_axes))).eval()
    clips = [speech_like(s, seed=i) for i, s in enumerate((1.0, 0.45, 0.7))]
    batch = collate([{"audio": c} for c in clips])
    assert batch["audio_padding"].shape == (3, 16000)
    with torch.no_grad():
        pooled = student.embed(batch)
        tokens = student.tokenize(batch)
        for i, clip in enumerate(clips):
            alone = student.embed({"audio": clip[None]})
            torch.testing.assert_close(pooled[i], alone[0], rtol=1e-4, atol=1e-4)
    real = (~tokens.padding).sum(1).tolist()
    per_clip = [student.tokenize({"audio": c[None]}).x.shape[1] for c in clips]
    assert real == per_clip and real[0] > real[2] > real[1]


def test_log_mel_pictures_render_targets_back_and_grey_out_dropped_patches():
    tok = SpectrogramPatchTokenizer(32, (16, 16), n_mels=64, max_seconds=1.0)
    t = torch.arange(16000) / 16000
    low, high = torch.sin(2 * math.pi * 200 * t), torch.sin(2 * math.pi * 6000 * t)
    wave = torch.stack([low, high])
    image = tok.preview(wave)
    assert image.shape == (2, 1, 64, 96)
    # low bins at the bottom: the 200 Hz tone is bright in the lower rows, the 6 kHz one in the upper
    assert image[0, 0, 32:].mean() > image[0, 0, :32].mean() and image[1, 0, :32].mean() > image[1, 0, 32:].mean()
    targets = tok(wave).targets
    keep = torch.ones(targets.shape[:2], dtype=torch.bool)
    assert torch.allclose(tok.render(wave, targets, keep), image, atol=1e-5)  # normalized targets, de-normalized
    keep[:, 0] = False  # the first (time 0, lowest mels) patch: the bottom-left corner
    dropped = tok.render(wave, targets, keep)
    assert (dropped[:, 0, -16:, :16] == 0.5).all() and torch.allclose(dropped[:, 0, :-16], image[:, 0, :-16], atol=1e-5)
