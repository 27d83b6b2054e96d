"""Reading torch.distributed.checkpoint folders without running code from them.

DCP's own reader unpickles the folder's ``.metadata`` with the general unpickler, and its planner
loads every non-tensor value with ``torch.load(weights_only=False)``: a crafted folder runs code.
Here the metadata goes through an unpickler that builds only DCP's own metadata classes (plus the
torch sizes, dtypes and paths they hold), every file it names must be a plain file of the folder,
and non-tensor values load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .checkpoint import CheckpointError

__all__ = ["SafeShardReader", "SafeLoadPlanner"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# what DCP's metadata pickle references besides the classes of its metadata module
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _METADATA_MODULE:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == _METADATA_MODULE:  # its dataclasses and enums
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path} references {module}.{name}, which checkpoint metadata never holds: "
                              f"refusing to load it (a crafted or foreign file)")


def _plain_file_of(folder: Path, relative: Any, metadata: Path) -> None:
    if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
        raise CheckpointError(f"{metadata} points at {relative!r}, which is not a file of its own folder: refusing to read it")


class SafeShardReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by the restricted unpickler and checked."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except FileNotFoundError as e:
            raise CheckpointError(f"sharded checkpoint {self.path} is incomplete: {path.name} is missing") from e
        except Exception as e:  # a torn or foreign file: pickle raises several types
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        for info in (metadata.storage_data or {}).values():
            _plain_file_of(Path(self.path), getattr(info, "relative_path", None), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that loads non-tensor values with ``weights_only=True``.

    Attributes:
        refused: the error for a value it would not load (DCP re-raises it wrapped in its own).
    """

    refused: Optional[CheckpointError] = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler refuses a global or the bytes are torn
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.refused = CheckpointError(f"a value of the sharded checkpoint ({read_item.dest_index.fqn}) cannot be "
                                           f"read safely ({type(e).__name__}: {first_line[:200]})")
            raise self.refused from e
        clean = io.BytesIO()  # the parent loads what it is given: give it a pickle of the checked value
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
