"""The layout of a run folder (DESIGN.md, Run folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

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

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        if not self.metrics.is_file():
            return
        with open(self.metrics) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
