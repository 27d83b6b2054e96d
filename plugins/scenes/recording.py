"""An MCAP recording's index: where each message is, its sensor stamp, and every transform on
``/tf`` and ``/tf_static``, found in one pass over the file and cached beside it (or in
``index_dir``) so that random access during training reads only the chunks it needs.

The pass uses the ``mcap`` package's stream reader on the data section record by record, so a
recording cut short by a crash (no summary, a half-written chunk) still yields every complete
chunk before the cut: `RecordingIndex.lost` says how much was not readable. The cache is an
``.npz`` read with ``allow_pickle=False`` and is rebuilt when the recording's size or mtime changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ...core.data import cache_dir
from ...core.errors import CorruptFileError, DataError
from .ros import schema_type, stamp_ns
from .rotations import interpolate_rigid, rigid_from_quaternion

__all__ = ["RecordingIndex", "TransformTree", "index_recording", "MessageReader"]

log = logging.getLogger(__name__)
INDEX_FORMAT = "anymodal-mcap-index/2"
TF_TOPICS = ("/tf", "/tf_static")
# one row per message: channel id, sensor stamp (header.stamp, else log time) and log time in ns,
# the file offset of the record holding it (a chunk, or the message itself), its slot in the chunk
# (-1: not in a chunk), and 1 where its payload did not decode during indexing
CHANNEL, STAMP, LOG_TIME, OFFSET, SLOT, BAD = range(6)


@dataclass
class RecordingIndex:
    path: str
    channels: dict[int, dict[str, Any]]  # id -> topic, schema_id, message_encoding
    schemas: dict[int, dict[str, Any]]  # id -> name, encoding, data (the message definition text)
    messages: np.ndarray  # int64 [M, 6], the columns above
    tf_edges: list[tuple[str, str, bool]]  # (parent, child, static)
    tf_edge: np.ndarray  # int64 [K]: which edge each transform sets
    tf_stamp: np.ndarray  # int64 [K] ns
    tf_value: np.ndarray  # float64 [K, 7]: translation, quaternion (w, x, y, z)
    lost: Optional[str] = None  # what the pass could not read (a truncated or damaged tail)
    start_ns: int = 0  # the earliest stamp: timestamps in samples count from it (small enough for float32)

    def topic_rows(self, topic: str) -> np.ndarray:
        """The rows of ``messages`` on ``topic``, by sensor stamp."""
        ids = [cid for cid, c in self.channels.items() if c["topic"] == topic]
        rows = np.flatnonzero(np.isin(self.messages[:, CHANNEL], ids))
        return rows[np.argsort(self.messages[rows, STAMP], kind="stable")]

    def topic_schema(self, topic: str) -> Optional[dict[str, Any]]:
        for c in self.channels.values():
            if c["topic"] == topic:
                return self.schemas.get(c["schema_id"], {"name": "(no schema)", "encoding": "", "data": ""})
        return None

    def topics(self) -> list[str]:
        return sorted({c["topic"] for c in self.channels.values()})


def _index_path(path: Path, index_dir: Optional[str]) -> list[Path]:
    """Where the index may live: ``index_dir``, else beside the recording, then the cache folder
    (for a recording in a folder that cannot be written)."""
    name = path.name + ".anymodal-index.npz"
    if index_dir:
        return [Path(index_dir).expanduser() / name]
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.with_name(name), Path(cache_dir("mcap-index")) / f"{digest}-{name}"]


def index_recording(path: str | Path, index_dir: Optional[str] = None) -> RecordingIndex:
    """The index of ``path``: read from its cache when that matches the file, else built and cached."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read MCAP recording {str(path)!r}: {e.strerror or e}") from None
    source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    candidates = _index_path(path, index_dir)
    for cached in candidates:
        index = _load(cached, path, source)
        if index is not None:
            return index
    index = _scan(path)
    for cached in candidates:
        if _save(index, cached, source):
            break
    return index


def _load(cached: Path, path: Path, source: dict[str, int]) -> Optional[RecordingIndex]:
    if not cached.is_file():
        return None
    try:
        with np.load(cached, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != INDEX_FORMAT or meta.get("source") != source:
                return None
            return RecordingIndex(str(path), {int(k): v for k, v in meta["channels"].items()},
                                  {int(k): v for k, v in meta["schemas"].items()}, z["messages"],
                                  [tuple(e) for e in meta["tf_edges"]], z["tf_edge"], z["tf_stamp"], z["tf_value"],
                                  meta["lost"], int(meta["start_ns"]))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        log.warning("rebuilding the index of %s: its cache %s is unreadable (%s)", path, cached, e)
        return None


def _save(index: RecordingIndex, cached: Path, source: dict[str, int]) -> bool:
    meta = {"format": INDEX_FORMAT, "source": source, "channels": index.channels, "schemas": index.schemas,
            "tf_edges": index.tf_edges, "lost": index.lost, "start_ns": index.start_ns}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), messages=index.messages,
                     tf_edge=index.tf_edge, tf_stamp=index.tf_stamp, tf_value=index.tf_value)
        os.replace(tmp, cached)  # atomic: two runs indexing one recording each write a whole file
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


def _record_size(record: Any) -> int:
    """Bytes a Chunk or Message record takes in the file (opcode and length included)."""
    from mcap.records import Chunk

    if isinstance(record, Chunk):
        return 9 + 8 + 8 + 8 + 4 + 4 + len(record.compression.encode()) + 8 + len(record.data)
    return 9 + 2 + 4 + 8 + 8 + len(record.data)


class _Decoders:
    """ROS 2 (CDR) payload decoders per schema; None for payloads of other encodings."""

    def __init__(self) -> None:
        from mcap_ros2.decoder import DecoderFactory

        self.factory, self.cache = DecoderFactory(), {}

    def get(self, channel: dict[str, Any], schema: Optional[dict[str, Any]]) -> Optional[Callable[[bytes], Any]]:
        if schema is None or channel["message_encoding"] != "cdr" or schema["encoding"] != "ros2msg":
            return None
        key = channel["schema_id"]
        if key not in self.cache:
            from mcap.records import Schema

            try:
                self.cache[key] = self.factory.decoder_for("cdr", Schema(id=key, name=schema["name"], encoding="ros2msg",
                                                                         data=schema["data"].encode()))
            except Exception as e:  # a message definition the ROS 2 parser rejects: its topic cannot be decoded
                log.debug("schema %s does not parse: %s", schema["name"], e)
                self.cache[key] = None
        return self.cache[key]


def _scan(path: Path) -> RecordingIndex:
    from mcap.records import Channel, Chunk, Footer, Message, Schema
    from mcap.stream_reader import StreamReader, breakup_chunk

    channels: dict[int, dict[str, Any]] = {}
    schemas: dict[int, dict[str, Any]] = {}
    rows: list[tuple[int, ...]] = []
    edges: dict[tuple[str, str, bool], int] = {}
    tf_rows: list[tuple[int, int, list[float]]] = []
    decoders = _Decoders()
    lost, end, size = None, 8, path.stat().st_size

    def add(record: Any, offset: int, slot: int) -> None:
        if isinstance(record, Schema):
            schemas[record.id] = {"name": record.name, "encoding": record.encoding,
                                  "data": record.data.decode("utf-8", "replace")}
        elif isinstance(record, Channel):
            channels[record.id] = {"topic": record.topic, "schema_id": record.schema_id,
                                   "message_encoding": record.message_encoding}
        elif isinstance(record, Message) and record.channel_id in channels:
            channel = channels[record.channel_id]
            decode = decoders.get(channel, schemas.get(channel["schema_id"]))
            stamp, bad = record.log_time, 0
            if decode is not None:
                try:
                    msg = decode(record.data)
                    if hasattr(msg, "header"):
                        stamp = stamp_ns(msg.header.stamp)
                    if channel["topic"] in TF_TOPICS and hasattr(msg, "transforms"):
                        static = channel["topic"] == "/tf_static"
                        for t in msg.transforms:
                            key = (t.header.frame_id.lstrip("/"), t.child_frame_id.lstrip("/"), static)
                            r, tr = t.transform.rotation, t.transform.translation
                            tf_rows.append((edges.setdefault(key, len(edges)), stamp_ns(t.header.stamp),
                                            [tr.x, tr.y, tr.z, r.w, r.x, r.y, r.z]))
                except Exception:  # a payload that does not decode is marked; reading it names it
                    bad = 1
            rows.append((record.channel_id, stamp, record.log_time, offset, slot, bad))

    with open(path, "rb") as f:
        try:
            for record in StreamReader(f, emit_chunks=True).records:
                end = f.tell()
                if isinstance(record, Chunk):
                    offset = end - _record_size(record)
                    for slot, inner in enumerate(breakup_chunk(record, validate_crc=True)):
                        add(inner, offset, slot)
                elif isinstance(record, Message):
                    add(record, end - _record_size(record), -1)
                else:
                    add(record, -1, -1)
                if isinstance(record, Footer):
                    break
            else:
                lost = f"no footer after byte {end:,} of {size:,}: the recording ends without its summary"
        except Exception as e:  # the reader's own errors, and zstd/lz4/struct errors of a cut or damaged chunk
            lost = (f"unreadable from byte {end:,} of {size:,} ({size - end:,} bytes, "
                    f"{(size - end) / max(size, 1):.0%} of the file): {type(e).__name__}: {e}".rstrip(": "))
    messages = np.asarray(rows, np.int64).reshape(-1, 6)
    if not len(messages) and lost:
        raise CorruptFileError(str(path), f"not a readable MCAP recording: {lost}")
    values = np.asarray([v for _, _, v in tf_rows], np.float64).reshape(-1, 7)
    return RecordingIndex(str(path), channels, schemas, messages, list(edges),
                          np.asarray([e for e, _, _ in tf_rows], np.int64), np.asarray([s for _, s, _ in tf_rows], np.int64),
                          values, lost, int(messages[:, STAMP].min()) if len(messages) else 0)


@dataclass
class TransformTree:
    """The frames of ``/tf_static`` and ``/tf`` as a tree: each child has one parent; a static edge
    holds one transform, a dynamic one a stamped series, interpolated between its stamps and held
    for ``tolerance_ns`` beyond its ends."""

    index: RecordingIndex
    tolerance_ns: int
    parent: dict[str, tuple[str, int]] = field(default_factory=dict)  # child -> (parent, edge)

    def __post_init__(self) -> None:
        for e, (parent, child, static) in enumerate(self.index.tf_edges):
            # a frame published on both topics: the static one wins (it is the calibration)
            if child not in self.parent or static:
                self.parent[child] = (parent, e)
        self.series = {}
        for e in range(len(self.index.tf_edges)):
            rows = np.flatnonzero(self.index.tf_edge == e)
            rows = rows[np.argsort(self.index.tf_stamp[rows], kind="stable")]
            self.series[e] = (self.index.tf_stamp[rows], self.index.tf_value[rows])

    def frames(self) -> list[str]:
        return sorted(set(self.parent) | {p for p, _ in self.parent.values()})

    def _edge(self, e: int, t: int) -> np.ndarray:
        stamps, values = self.series[e]
        parent, child, static = self.index.tf_edges[e]
        if static:
            return rigid_from_quaternion(values[-1, :3], values[-1, 3:])
        i = int(np.searchsorted(stamps, t))
        if i == 0 or i == len(stamps):
            j = 0 if i == 0 else len(stamps) - 1
            if abs(int(stamps[j]) - t) > self.tolerance_ns:
                raise LookupError(f"/tf has {parent} -> {child} from {(stamps[0] - self.index.start_ns) / 1e9:.3f} s to "
                                  f"{(stamps[-1] - self.index.start_ns) / 1e9:.3f} s, not at "
                                  f"{(t - self.index.start_ns) / 1e9:.3f} s")
            return rigid_from_quaternion(values[j, :3], values[j, 3:])
        a, b = rigid_from_quaternion(values[i - 1, :3], values[i - 1, 3:]), rigid_from_quaternion(values[i, :3], values[i, 3:])
        span = int(stamps[i]) - int(stamps[i - 1])
        return interpolate_rigid(a, b, (t - int(stamps[i - 1])) / span if span else 1.0)

    def _chain(self, frame: str) -> list[tuple[str, int]]:
        """``frame``'s way up the tree: (frame, edge to its parent) pairs, then (root, -1)."""
        chain, seen = [], {frame}
        while frame in self.parent:
            parent, e = self.parent[frame]
            chain.append((frame, e))
            if parent in seen:
                raise LookupError(f"the transforms form a loop through {parent!r}")
            seen.add(parent)
            frame = parent
        return chain + [(frame, -1)]

    def _up(self, chain: list[tuple[str, int]], ancestor: str, t: int) -> np.ndarray:
        """The transform from the chain's first frame to ``ancestor`` at ``t``."""
        m = np.eye(4)
        for frame, e in chain:
            if frame == ancestor:
                break
            m = self._edge(e, t) @ m
        return m

    def lookup(self, target: str, source: str, t: int) -> np.ndarray:
        """The 4x4 transform from ``source`` coordinates to ``target`` coordinates at time ``t`` (ns),
        through their nearest common ancestor (so only the edges between them need to be known at ``t``).

        Raises:
            LookupError: the frames are not connected, or a dynamic transform on the way is not
                known at ``t``; the message says which.
        """
        up_s, up_t = self._chain(source.lstrip("/")), self._chain(target.lstrip("/"))
        above_t = {frame for frame, _ in up_t}
        common = next((frame for frame, _ in up_s if frame in above_t), None)
        if common is None:
            raise LookupError(f"no transform connects {source!r} to {target!r}")
        return np.linalg.inv(self._up(up_t, common, t)) @ self._up(up_s, common, t)


class MessageReader:
    """Random access to one recording's messages by index row, in any process: the file is opened
    per process (a DataLoader worker must not share a parent's file offset), and the last chunk read
    is kept decompressed (a frame's sensors are usually in one chunk)."""

    def __init__(self, index: RecordingIndex) -> None:
        self.index = index
        self._pid: Optional[int] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index, "_pid": None}

    def _open(self) -> None:
        self._file = open(self.index.path, "rb")
        self._decoders, self._chunk = _Decoders(), (None, None)
        self._pid = os.getpid()

    def read(self, row: int) -> tuple[str, Any]:
        """``(schema name, decoded message)`` of ``messages[row]``.

        Raises:
            CorruptFileError: the bytes at its offset are not what the index found there (the file
                changed), or its payload does not decode.
        """
        from mcap.records import Chunk, Message
        from mcap.stream_reader import StreamReader, breakup_chunk

        if self._pid != os.getpid():
            self._open()
        channel_id, _, log_time, offset, slot, bad = (int(v) for v in self.index.messages[row])
        channel = self.index.channels[channel_id]
        schema = self.index.schemas.get(channel["schema_id"])
        where = f"topic {channel['topic']} at log time {(log_time - self.index.start_ns) / 1e9:.3f} s"
        try:
            if slot >= 0 and self._chunk[0] == offset:
                records = self._chunk[1]
            else:
                self._file.seek(offset)
                head = self._file.read(9)
                length = struct.unpack("<Q", head[1:9])[0]
                body = self._file.read(length)
                record = next(iter(StreamReader(io.BytesIO(head + body), skip_magic=True, emit_chunks=True).records))
                records = breakup_chunk(record) if isinstance(record, Chunk) else [record]
                if isinstance(record, Chunk):
                    self._chunk = (offset, records)
            message = records[slot] if slot >= 0 else records[0]
            if not isinstance(message, Message) or message.channel_id != channel_id or message.log_time != log_time:
                raise ValueError("the recording changed since it was indexed (delete its .anymodal-index.npz)")
        except (IndexError, ValueError, struct.error, StopIteration) as e:
            raise CorruptFileError(self.index.path, f"{where}: {e}") from None
        except Exception as e:  # decompression errors of a damaged chunk
            raise CorruptFileError(self.index.path, f"{where}: {type(e).__name__}: {e}") from None
        decode = self._decoders.get(channel, schema)
        if decode is None or bad:
            raise CorruptFileError(self.index.path, f"{where}: its {channel['message_encoding']} payload "
                                                    f"({schema['name'] if schema else 'no schema'}) does not decode")
        try:
            return schema_type(schema["name"]), decode(message.data)
        except Exception as e:
            raise CorruptFileError(self.index.path, f"{where}: {schema['name']} payload does not decode: {e}") from None
