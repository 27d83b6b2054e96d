"""Text tokenizers (bytes, CLIP BPE) and the text tower of contrastive objectives."""

import gzip

import pytest
import torch

from anymodal.objectives.text_tower import TextEncoder
from anymodal.tokenizers import text as text_module
from anymodal.tokenizers.text import ByteTextTokenizer, ClipBpe, ClipBpeTokenizer, find_clip_vocab


def _clip_vocab():
    try:
        return find_clip_vocab()
    except FileNotFoundError as e:
        pytest.skip(f"CLIP BPE vocabulary not installed ({e})")


# ---------------------------------------------------------------- bytes


def test_byte_round_trip_and_layout():
    tok = ByteTextTokenizer(dim=8, max_len=32)
    texts = ["a photo of a cat", "naïve café 🙂 — 東京", "x"]
    ids, padding = tok.encode(texts)
    assert tok.decode(ids) == texts
    assert ids.shape == (3, len("naïve café 🙂 — 東京".encode()) + 2)
    assert (ids[:, 0] == tok.bos_id).all()
    lengths = (~padding).sum(1)
    assert lengths.tolist() == [len(t.encode()) + 2 for t in texts]
    assert (ids[torch.arange(3), lengths - 1] == tok.eos_id).all()
    assert (ids[padding] == tok.pad_id).all()
    assert tok.vocab_size == 259 and tok.grid_size == (32,) and tok.pos_axes == 1 and tok.input_key == "text"


def test_byte_truncation_keeps_eos():
    tok = ByteTextTokenizer(dim=8, max_len=6)
    ids, padding = tok.encode(["abcdefghij", "ab"])
    assert ids.shape == (2, 6)
    assert ids[0].tolist() == [256, *b"abcd", 257]
    assert padding.tolist() == [[False] * 6, [False] * 4 + [True] * 2]
    assert tok.decode(ids) == ["abcd", "ab"]
    # a multi-byte character cut in half decodes as the replacement character, never raises
    short = ByteTextTokenizer(dim=8, max_len=3)
    assert short.decode(short.encode(["é!"])[0]) == ["\ufffd"]


def test_byte_tokens():
    tok = ByteTextTokenizer(dim=8, max_len=16)
    t = tok(["ab", "abcd"])
    assert t.x.shape == (2, 6, 8) and t.pos.shape == (2, 6, 1) and t.pos.dtype == torch.long
    assert t.pos[1, :, 0].tolist() == list(range(6))
    assert t.padding.tolist() == [[False] * 4 + [True] * 2, [False] * 6]
    assert t.grid is None and t.targets is None and t.modality == "text"
    assert torch.equal(t.x[0, 4:], torch.zeros(2, 8))  # the padding row is zero and gets no gradient
    t.x.sum().backward()
    assert torch.equal(tok.embed.weight.grad[tok.pad_id], torch.zeros(8))


@pytest.mark.parametrize("bad, error", [("one string", TypeError), ([b"bytes"], TypeError), ([], ValueError)])
def test_byte_rejects_bad_input(bad, error):
    with pytest.raises(error, match="ByteTextTokenizer"):
        ByteTextTokenizer(dim=8).encode(bad)


def test_max_len_too_small():
    with pytest.raises(ValueError, match="max_len"):
        ByteTextTokenizer(dim=8, max_len=2)


# ---------------------------------------------------------------- CLIP BPE


def test_clip_bpe_known_ids():
    tok = ClipBpeTokenizer(dim=8, max_len=77, vocab_path=str(_clip_vocab()))
    ids, padding = tok.encode(["a photo of a cat", "A  Photo of a CAT "])
    # the ids openai/CLIP's clip.tokenize gives for "a photo of a cat"
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert torch.equal(ids[0], ids[1]) and not padding.any()  # lowercased, whitespace collapsed
    assert tok.vocab_size == 49409 and tok.pad_id == 49408


def test_clip_bpe_round_trip_and_truncation():
    _clip_vocab()
    tok = ClipBpeTokenizer(dim=8, max_len=8)  # the vocabulary found in the installed package
    text = "Hello,   World! It's 2024 &amp; naïve café 🙂"
    bpe = tok.bpe
    ids = bpe.encode(text)
    # decoding puts a space at every word end (punctuation and each digit are words)
    assert bpe.decode(ids).replace(" ", "") == "hello,world!it's2024&naïvecafé🙂"
    assert all(i < 49406 for i in ids)
    rows, padding = tok.encode([text, "cat"])
    assert rows.shape == (2, 8) and rows[0, -1] == tok.eos_id and rows[0, 1:7].tolist() == ids[:6]
    assert padding[1].tolist() == [False] * 3 + [True] * 5
    x = tok([text, "cat"])
    assert x.x.shape == (2, 8, 8)


def test_clip_bpe_missing_vocab(monkeypatch, tmp_path):
    monkeypatch.setattr(text_module, "_VOCAB_PACKAGES", (("no_such_package_xyz", "open-clip-torch"),))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        find_clip_vocab()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipBpe(tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not CLIP's merges file"):
        ClipBpe(bad)


# ---------------------------------------------------------------- text tower


def test_text_encoder_shape_and_padding_invariance():
    torch.manual_seed(0)
    enc = TextEncoder(ByteTextTokenizer(32, max_len=32), depth=2, num_heads=4).eval()
    alone = enc(["a cat"])
    batched = enc(["a cat", "a considerably longer caption about a dog"])
    assert alone.shape == (1, 32) and batched.shape == (2, 32)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_text_encoder_clip_bpe():
    _clip_vocab()
    enc = TextEncoder(ClipBpeTokenizer(16), depth=1, num_heads=2)
    assert enc.dim == 16 and enc.input_key == "text"
    assert enc(["a photo of a cat"]).shape == (1, 16)


def test_text_encoder_width_is_its_tokenizers():
    assert TextEncoder(ByteTextTokenizer(24), dim=24, depth=1, num_heads=2).dim == 24
    with pytest.raises(ValueError, match="text.dim is 16 but its tokenizer makes tokens of width 24"):
        TextEncoder(ByteTextTokenizer(24), dim=16)


def test_text_tower_imports_no_tokenizer():
    # objectives get their tokenizers built by core.build from the registry (byte_text, clip_bpe, a plugin's)
    import ast
    import inspect

    from anymodal.objectives import contrastive, text_tower

    for module in (text_tower, contrastive):
        tree = ast.parse(inspect.getsource(module))
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if "tokenizers" in m or "plugins" in m], (module.__name__, imported)
