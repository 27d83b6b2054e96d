"""The shard format: webdataset tar files plus a JSON manifest.

A shard is a plain tar in webdataset's layout (every sample's fields are members named
``<key>.<field>.<ext>``, a sample's members adjacent), so ``tar``, webdataset and DALI read it too.
Tensors are ``.npy`` (``numpy.save``; read back with ``allow_pickle=False``: loading never runs
code), strings ``.txt``, other values ``.json``. A field name is percent-encoded in a member name
(a scene's ``cam_front/intrinsics`` holds a slash, which tar would read as a folder).

Beside each shard, ``<shard>.idx.npy`` holds where each sample's members start and a digest of its
bytes' CRC-32 (`sample_index`): a sample is one read, checked as it is read, and opening a shard reads
nothing else of it. The manifest (``manifest.json``) lists every shard with its sample count,
size and SHA-256 (and its index's), the fields of a sample and the source the shards were written
from.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tarfile
import urllib.parse
import zlib
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = ["FORMAT", "MANIFEST", "encode_sample", "decode_member", "field_spec", "shard_name", "check_manifest",
           "sample_index", "sample_members", "sample_digest", "index_name"]

FORMAT = "anymodal-shards/1"
MANIFEST = "manifest.json"
_EXTENSIONS = ("npy", "txt", "json")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _member_field(field: str) -> str:
    return urllib.parse.quote(field, safe="").replace(".", "%2E")


def encode_sample(key: str, sample: Mapping[str, Any]) -> dict[str, bytes]:
    """Member name -> bytes for one sample (``key`` holds no dot)."""
    out = {}
    for field, value in sample.items():
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16: the widening is exact
                value = value.float()
            value = value.numpy()
        if isinstance(value, np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            out[f"{key}.{_member_field(field)}.npy"] = buffer.getvalue()
        elif isinstance(value, str):
            out[f"{key}.{_member_field(field)}.txt"] = value.encode()
        else:
            try:
                text = json.dumps(value.item() if isinstance(value, np.generic) else value, allow_nan=True)
            except TypeError:
                raise DataError(f"sample {key} field {field!r} is a {type(value).__name__}: shards hold tensors, "
                                "arrays, strings and JSON values") from None
            out[f"{key}.{_member_field(field)}.json"] = text.encode()
    return out


@functools.lru_cache(maxsize=4096)  # the same few field names in every sample
def _field_ext(rest: str) -> Optional[tuple[str, str]]:
    field, dot, ext = rest.partition(".")
    if not dot or ext not in _EXTENSIONS:
        return None
    return urllib.parse.unquote(field), ext


def decode_member(ext: str, data: Any, where: Any) -> Any:
    """The value of a member's bytes (``bytes`` or a ``memoryview`` of a writable buffer, which
    a tensor then shares); DataError naming ``where`` (a string, or a callable making one only
    when it is needed) when they do not decode."""
    try:
        if ext == "npy":
            return torch.from_numpy(_npy(data))
        if ext == "txt":
            return str(data, "utf-8")
        raw = bytes(data)
        if raw.isdigit() and (len(raw) == 1 or raw[0] != 48):  # a class label: no JSON parser needed
            return int(raw)
        return json.loads(raw)
    except (ValueError, EOFError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{where() if callable(where) else where} does not decode as .{ext}: {e}") from None


def _npy(data: Any) -> np.ndarray:
    """A ``.npy`` member's array; the header is parsed once per distinct header (numpy's own literal
    parser, no pickle), so a field of one shape decodes with one ``frombuffer``. Over a writable
    buffer the array is a view of it (no copy); over ``bytes``, a copy."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array")
    size_bytes = 2 if data[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    dtype, shape, fortran = _npy_header(bytes(data[:end]))
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f"{len(data) - end} bytes of array data, the header says {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype, count, end).reshape(shape, order="F" if fortran else "C")
    return array if array.flags.writeable else array.copy()


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple, bool]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("an array of Python objects (it would need pickle)")
    return dtype, tuple(shape), fortran


def field_spec(sample: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Field -> ``{kind, dtype, shape}`` of one sample, for the manifest (shapes of the first sample)."""
    spec = {}
    for field, value in sample.items():
        if isinstance(value, (Tensor, np.ndarray)):
            spec[field] = {"kind": "tensor", "dtype": str(value.dtype).replace("torch.", ""), "shape": list(value.shape)}
        else:
            spec[field] = {"kind": "text" if isinstance(value, str) else "json"}
    return spec


def sample_index(shard: bytes) -> Any:
    """The index a shard's sidecar holds: ``int64 [samples + 1, 2]``, row ``j`` the byte offset where
    sample ``j``'s members start and the CRC-32 of its bytes up to the next row's offset. Reading a sample is then one read of its byte range, checked by its digest."""
    starts, last_key, offset = [], None, 0
    while offset + tarfile.BLOCKSIZE <= len(shard):
        header = shard[offset:offset + tarfile.BLOCKSIZE]
        if header == _EMPTY_BLOCK:
            break
        name, length = _header(header, offset, "the shard being written")
        key = name.split(".", 1)[0]
        if key != last_key:
            starts.append(offset)
            last_key = key
        offset += tarfile.BLOCKSIZE + -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    bounds = starts + [offset]
    rows = np.zeros((len(starts) + 1, 2), dtype=np.int64)
    rows[:, 0] = bounds
    rows[:-1, 1] = [sample_digest(shard[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return rows


def sample_digest(data: bytes) -> int:
    """CRC-32 of a sample's bytes: catches damage at a few GB/s (the manifest's SHA-256s guard the files)."""
    return zlib.crc32(data)


def _header(header: bytes, offset: int, where: str) -> tuple[str, int]:
    """Name and size of a plain ustar file member's header (the writer's; others are refused)."""
    if header[156] not in _FILE_TYPES:
        raise DataError(f"{where} has a member of tar type {header[156:157]!r} at byte {offset}: anymodal shards "
                        "hold plain files")
    end = header.find(0, 0, 100)
    try:
        return header[:100 if end < 0 else end].decode(), int(header[124:136].strip(b"\0 ") or b"0", 8)
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{where} is not a readable tar at byte {offset}") from None


_FILE_TYPES = frozenset(b"0\0")


def sample_members(data: Any, where: str) -> tuple[str, list[tuple[str, str, Any]]]:
    """One sample's byte range parsed: ``(key, [(field, ext, value), ...])``, each value a slice of
    ``data`` (a ``memoryview`` when ``data`` is one: no copies)."""
    members, key, offset, size = [], None, 0, len(data)
    while offset < size:
        header = bytes(data[offset:offset + tarfile.BLOCKSIZE])
        if len(header) < tarfile.BLOCKSIZE:
            raise DataError(f"{where}: the member header at byte {offset} is cut short")
        name, length = _header(header, offset, where)
        start = offset + tarfile.BLOCKSIZE
        if start + length > size:
            raise DataError(f"{where}: member {name!r} runs past the sample's byte range")
        member_key, dot, rest = name.partition(".")
        parsed = _field_ext(rest)
        if not member_key or parsed is None:
            raise DataError(f"{where}: member {name!r} is not <key>.<field>.<npy|txt|json>")
        if key is not None and member_key != key:
            raise DataError(f"{where}: member {name!r} belongs to another sample than {key}")
        key = member_key
        members.append((parsed[0], parsed[1], data[start:start + length]))
        offset = start + -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if key is None:
        raise DataError(f"{where} holds no members")
    return key, members


_EMPTY_BLOCK = bytes(tarfile.BLOCKSIZE)


def index_name(shard: str) -> str:
    """The sidecar holding a shard's sample index."""
    return f"{shard}.idx.npy"


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """A manifest's content, checked: the keys this reader needs, with the right types."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{where} is not an anymodal shard manifest (format {found!r}, expected {FORMAT!r})")
    shards, fields = manifest.get("shards"), manifest.get("fields")
    if not isinstance(shards, list) or not isinstance(fields, dict) or not fields:
        raise DataError(f"{where}: `shards` must be a list and `fields` a non-empty mapping")
    for i, shard in enumerate(shards):
        ok = (isinstance(shard, dict) and isinstance(shard.get("name"), str) and shard["name"] == shard_name(i)
              and all(isinstance(shard.get(k), int) and not isinstance(shard.get(k), bool) and shard[k] >= 0
                      for k in ("samples", "bytes", "index_bytes"))
              and all(isinstance(shard.get(k), str) and len(shard[k]) == 64 for k in ("sha256", "index_sha256")))
        if not ok:
            raise DataError(f"{where}: shard entry {i} must be {{name: {shard_name(i)}, samples, bytes, sha256, "
                            f"index_bytes, index_sha256}}, got {shard!r:.200}")
    return manifest
