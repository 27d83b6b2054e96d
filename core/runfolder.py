"""The layout of a run folder (DESIGN.md, Run folder), and the rules that keep one run per folder.

`RunFolder.lock` takes an exclusive lock for the run's lifetime (released by the kernel when the
process dies, ``kill -9`` included, even while its data-loader workers live on), and says who holds it when it is taken. `clean_orphans`
removes what killed writes left behind. `keep_metrics_until` cuts ``metrics.jsonl`` back to a
checkpoint, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import UserError

__all__ = ["RunFolder", "RunFolderBusy", "write_atomic"]

log = logging.getLogger("anymodal.train")


class RunFolderBusy(UserError):
    """Another process is running in this run folder."""


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def changes(self) -> Path:
        """One JSON line per resume that changed the config (``--allow-changes``): what, when, from which step."""
        return self.root / "config-changes.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    def final(self, stage: str) -> Path:
        return self.checkpoints / f"{stage}-final.pt"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        if not self.metrics.is_file():
            return
        with open(self.metrics) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's exclusive lock; `RunFolderBusy` names the holder if another process has it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:  # a POSIX record lock: data-loader workers forked from this process do not inherit it
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise RunFolderBusy(f"run folder {self.root} is in use by {holder}; wait for it to finish, or choose "
                                    f"another folder (--run-dir, or run.name=)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                           f"({' '.join(sys.argv[:6])})\n").encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def clean_orphans(self) -> None:
        """Remove temporary files of killed writes and shard folders that no checkpoint points at.

        Call it holding the lock: then no write of this folder is in flight.
        """
        orphans = [p for p in (*self.checkpoints.glob(".*.tmp"), *self.export.glob(".*.tmp"), *self.root.glob("*.tmp"))]
        for path in orphans:
            path.unlink(missing_ok=True)
        if orphans:
            log.info("removed %d temporary file(s) left by an interrupted write in %s", len(orphans), self.root)

    def drop_shards_except(self, keep: Optional[str]) -> None:
        """Remove every ``shards-*`` folder but ``keep`` (the one ``last.pt`` points at)."""
        for old in self.checkpoints.glob("shards-*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def keep_metrics_until(self, stages: Sequence[str], stage: Optional[str], step: int) -> None:
        """Drop metric lines written after ``(stage, step)`` in recipe order; all of them when ``stage`` is None."""
        if not self.metrics.is_file():
            return
        order = {name: i for i, name in enumerate(stages)}
        limit = (order[stage], step) if stage is not None else (-1, 0)
        kept = [r for r in self.read_metrics() if (order.get(r.get("stage"), len(order)), r.get("step", 0)) <= limit]
        tmp = self.metrics.with_name(f".{self.metrics.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics)

    def recorded_changes(self) -> list[tuple[str, Any]]:
        """Every change recorded by a resume, as ``(key, value after)``, oldest first: the run's config
        is ``config.yaml`` with these applied."""
        if not self.changes.is_file():
            return []
        return [(key, change["after"]) for line in self.changes.read_text().splitlines() if line.strip()
                for key, change in json.loads(line)["changes"].items()]

    def recorded_overrides(self) -> list[str]:
        """`recorded_changes` as ``key=value`` command-line overrides."""
        return [f"{key}={json.dumps(value)}" for key, value in self.recorded_changes()]

    def record_changes(self, changes: dict[str, tuple[Any, Any]], stage: str, step: int) -> None:
        """Append one resume's config changes (key -> (before, after)) to `changes`."""
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "stage": stage, "step": step,
                  "changes": {k: {"before": a, "after": b} for k, (a, b) in changes.items()}}
        with open(self.changes, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename over ``path``: an interrupted writer leaves whole files or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
