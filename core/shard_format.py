"""The shard format: webdataset tar files plus a JSON manifest.

A shard is a plain tar in webdataset's layout (every sample's fields are members named
``<key>.<field>.<ext>``, a sample's members adjacent), so ``tar``, webdataset and DALI read it too.
Tensors are ``.npy`` (``numpy.save``; read back with ``allow_pickle=False``: loading never runs
code), strings ``.txt``, other values ``.json``. A field name is percent-encoded in a member name
(a scene's ``cam_front/intrinsics`` holds a slash, which tar would read as a folder).

The manifest (``manifest.json`` beside the shards) lists every shard with its sample count, size
and SHA-256, the fields of a sample and the source the shards were written from.
"""

from __future__ import annotations

import io
import json
import tarfile
import urllib.parse
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = ["FORMAT", "MANIFEST", "encode_sample", "decode_member", "field_spec", "shard_name", "check_manifest",
           "index_tar"]

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
            np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
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


def split_member(name: str) -> tuple[str, str, str]:
    """``(key, field, ext)`` of a member name; DataError for one not in the format."""
    parts = name.split(".")
    if len(parts) != 3 or parts[2] not in _EXTENSIONS or not parts[0]:
        raise DataError(f"member {name!r} is not <key>.<field>.<npy|txt|json>")
    return parts[0], urllib.parse.unquote(parts[1]), parts[2]


def decode_member(ext: str, data: bytes, where: str) -> Any:
    """The value of a member's bytes; DataError naming ``where`` when they do not decode."""
    try:
        if ext == "npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
            return torch.from_numpy(array.copy() if not array.flags.writeable else array)
        if ext == "txt":
            return data.decode()
        return json.loads(data)
    except (ValueError, EOFError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{where} does not decode as .{ext}: {e}") from None


def field_spec(sample: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Field -> ``{kind, dtype, shape}`` of one sample, for the manifest (shapes of the first sample)."""
    spec = {}
    for field, value in sample.items():
        if isinstance(value, (Tensor, np.ndarray)):
            spec[field] = {"kind": "tensor", "dtype": str(value.dtype).replace("torch.", ""), "shape": list(value.shape)}
        else:
            spec[field] = {"kind": "text" if isinstance(value, str) else "json"}
    return spec


def index_tar(data: bytes, where: str) -> list[tuple[str, list[tuple[str, str, int, int]]]]:
    """A shard's samples in order, each ``(key, [(field, ext, data offset, data size), ...])``.

    Plain ustar headers (what the writer makes) are read directly, the name and size fields only
    (the manifest's SHA-256 guards the bytes); a shard with other member kinds (pax or GNU long
    names) goes through ``tarfile``. One cut short or not a tar is a DataError naming ``where``.
    """
    entries, offset, size = [], 0, len(data)
    while True:
        if offset + tarfile.BLOCKSIZE > size:
            raise DataError(f"shard {where} is cut short: it ends without the tar end-of-archive blocks")
        header = data[offset:offset + tarfile.BLOCKSIZE]
        if header == _EMPTY_BLOCK:
            break
        kind = header[156:157]
        if kind not in (b"0", b"\0"):
            entries = _index_with_tarfile(data, where) if kind in (b"x", b"g", b"L", b"K") else None
            if entries is None:
                raise DataError(f"shard {where} has a member of tar type {kind!r} at byte {offset}: shards hold files only")
            break
        try:
            name = header[:100].rstrip(b"\0").decode()
            length = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DataError(f"shard {where} is not a readable tar at byte {offset}") from None
        start = offset + tarfile.BLOCKSIZE
        if start + length > size:
            raise DataError(f"shard {where} is cut short: member {name!r} ends at byte {start + length}, the file has {size}")
        entries.append((name, start, length))
        offset = start + -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    samples: list[tuple[str, list[tuple[str, str, int, int]]]] = []
    for name, start, length in entries:
        key, field, ext = split_member(name)
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((field, ext, start, length))
    return samples


_EMPTY_BLOCK = bytes(tarfile.BLOCKSIZE)


def _index_with_tarfile(data: bytes, where: str) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
    except tarfile.TarError as e:
        raise DataError(f"shard {where} is not a readable tar: {e}") from None


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
                      for k in ("samples", "bytes"))
              and isinstance(shard.get("sha256"), str) and len(shard["sha256"]) == 64)
        if not ok:
            raise DataError(f"{where}: shard entry {i} must be {{name: {shard_name(i)}, samples, bytes, sha256}}, "
                            f"got {shard!r:.200}")
    return manifest
