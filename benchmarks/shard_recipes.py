"""The image MAE demo, the lidar-sweep MAE recipe and the two-stage audio recipe trained from their
files, from local shards and from shards on an S3 server on localhost (moto, a real subprocess),
then probed: do the probe results match?

    python benchmarks/shard_recipes.py [--steps 100] [--json benchmarks/results/shard_recipes_cpu.json]

Each recipe runs ``--steps`` steps per stage (the comparison, not the recipe's full length); shards
are written by ``anymodal shards write`` (to S3 directly with ``--out s3://...``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from shards import _start_server  # benchmarks/shards.py

RECIPES = {
    "image MAE demo": ["default"],
    "lidar-sweep MAE": ["default", "modality=lidar_sweep"],
    "two-stage audio (videoprism)": ["default", "modality=audio", "recipe=videoprism"],
}


def anymodal(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "anymodal", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"anymodal {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--json")
    args = p.parse_args()
    _start_server()
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    work = Path(tempfile.mkdtemp(prefix="anymodal-shard-recipes-"))
    rows = []
    for number, (name, config) in enumerate(RECIPES.items()):
        bucket = f"recipes-{number}"
        fs.mkdir(bucket)
        local, remote = work / f"shards-{number}", f"s3://{bucket}/shards"
        anymodal("shards", "write", *config, "--out", str(local), "--workers", "2", "--quiet")
        anymodal("shards", "write", *config, "--out", remote, "--quiet")
        steps = [f"recipe.stages.*.steps={args.steps}", "recipe.stages.*.optim.warmup_steps=10", "run.progress=false"]
        results = {}
        for source, path in (("files", None), ("local shards", str(local)), ("S3 shards", remote)):
            data = [] if path is None else [f"data.{s}={{_replace_: true, name: shards, path: '{path}'}}"
                                            for s in ("train", "test")]
            run = work / f"run-{number}-{source.replace(' ', '-')}"
            anymodal("train", *config, *steps, *data, "--run-dir", str(run))
            anymodal("eval", str(run), "--no-pictures")
            losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            probes = json.loads((run / "eval" / "results.json").read_text())["results"]
            results[source] = {"probes": probes, "last_loss": losses[-1], "losses": losses}
        same = all(r["losses"] == results["files"]["losses"] and r["probes"] == results["files"]["probes"]
                   for r in results.values())
        row = {"name": name, "config": config, "steps_per_stage": args.steps, "identical_to_files": same,
               **{source: {"probes": r["probes"], "last_loss": r["last_loss"]} for source, r in results.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
