"""Run several variants of a config through the real command line and tabulate their probes.

The experiments are YAML files in ``configs/experiment/``; ``anymodal demo --experiment two-stage``
runs one (the two-stage claim on moving digits). Also used by
``benchmarks/objectives.py`` (one row per recipe). Each variant trains in its own run folder
(``anymodal train``, wall time measured around it) and is evaluated there (``anymodal eval``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["run_variant", "format_rows", "experiment_names", "load_experiment"]

EXPERIMENT_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiment"


def experiment_names() -> list[str]:
    """The experiments ``anymodal demo --experiment`` runs: the files of ``configs/experiment/``."""
    return sorted(p.stem for p in EXPERIMENT_CONFIGS.glob("*.yaml"))


def load_experiment(name: str) -> dict[str, Any]:
    """An experiment's spec: ``config`` (the base config), ``common`` overrides, and ``variants``
    (name -> overrides, in file order)."""
    return yaml.safe_load((EXPERIMENT_CONFIGS / f"{name}.yaml").read_text())


def _cli(args: Sequence[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anymodal", *args], check=True)
    return time.perf_counter() - start


def run_variant(name: str, config: str, overrides: Sequence[str], folder: Path) -> dict[str, Any]:
    """Train and evaluate one variant; returns its eval summary plus the training wall time."""
    seconds = _cli(["train", config, *overrides, "run.progress=false", "--run-dir", str(folder)])
    _cli(["eval", str(folder), "--no-pictures"])
    summary = json.loads((folder / "eval" / "results.json").read_text())
    return {"variant": name, "train_seconds": round(seconds), **summary}


def format_rows(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    """One line per variant: probe accuracies per label field, retrieval R@1, wall time."""
    head = ["run"]
    for f in fields:
        head += [f"linear probe ({f})", f"k-NN ({f})"]
    head += ["retrieval R@1 (sample->text / text->sample)", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def probes(r: dict[str, float]) -> list[str]:
        cells = []
        for i, f in enumerate(fields):
            prefix = "" if i == 0 else f"{f}/"
            cells += [f"{100 * r[prefix + 'linear_probe']:.1f}%", f"{100 * r[prefix + 'knn']:.1f}%"]
        return cells

    for row in rows:
        trained = next(v for k, v in row["results"].items() if k != "random init")
        r1 = " ; ".join(f"{100 * r['sample_to_partner_r1']:.1f}% / {100 * r['partner_to_sample_r1']:.1f}%"
                        for r in row["retrieval"].values()) or "-"
        lines.append(f"| {row['variant']} | " + " | ".join(probes(trained)) + f" | {r1} | {row['train_seconds']} s |")
    if rows:
        lines.append("| random init | " + " | ".join(probes(rows[0]["results"]["random init"])) + " | - | - |")
    return "\n".join(lines)
