"""Run several variants of a config through the real command line and tabulate their probes.

Used by ``anymodal demo --experiment two-stage`` (the two-stage claim on moving digits) and by
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

__all__ = ["run_variant", "format_rows", "EXPERIMENTS"]

# the two-stage claim on video (VideoPrism): four runs with the same number of optimizer steps
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "two-stage": {
        "config": "default",
        "common": ["modality=video", "data.batch_size=64", "eval.max_train=6000", "eval.max_test=2000"],
        "variants": {
            "contrastive only (stage 1)": ["recipe=clip", "recipe.stages.contrastive.steps=800"],
            "masked modeling only (MAE)": ["recipe=mae", "recipe.stages.pretrain.steps=800"],
            "two-stage (VideoPrism)": ["recipe=videoprism", "recipe.stages.*.steps=400"],
            "two-stage, no token shuffle": ["recipe=videoprism", "recipe.stages.*.steps=400",
                                            "recipe.stages.distill.objectives.masked_distill.shuffle=false"],
        },
    },
    # why stage 2 did not add motion: one change at a time against the two-stage run above
    "two-stage-study": {
        "config": "default",
        "common": ["modality=video", "data.batch_size=64", "eval.max_train=6000", "eval.max_test=2000",
                   "recipe=videoprism", "recipe.stages.*.steps=400"],
        "variants": {
            "stage-2 targets: mean of the teacher's last 4 blocks, instance-normed":
                ["recipe.stages.distill.objectives.masked_distill.target_layers=4",
                 "recipe.stages.distill.objectives.masked_distill.target_norm=instance"],
            "stage-2 learning rate 2e-4 (keeps more of stage 1)": ["recipe.stages.distill.optim.lr=2e-4"],
            "stage-2 tube mask ratio 0.75 (was 0.9)": ["recipe.stages.distill.masker.ratio=0.75"],
            "tubelets 1x8x8 (one frame per token, 128 tokens)": ["modality.tokenizer.tubelet=[1,8,8]"],
            "stage 2 three times longer (400 + 1200 steps)": ["recipe.stages.distill.steps=1200"],
        },
    },
}


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
