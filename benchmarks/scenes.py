"""Lidar segmentation-probe mIoU on the generated street scenes, one run per scene recipe, same
encoder and the same total of optimizer steps, next to random init (the README's scene table).

    python benchmarks/scenes.py                    # every recipe, 600 steps each (about an hour)
    python benchmarks/scenes.py --steps 60         # a smoke run
    python benchmarks/scenes.py --jobs 2           # two runs at a time, one thread each

Each run goes through the real command line (`anymodal train default modality=street_scenes
recipe=<name>`, then `anymodal eval`) in runs/scenes/<name>; the table is written to
benchmarks/results/scenes_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# recipe -> its stages, which share the step budget evenly
RECIPES = {
    "mae": ["pretrain"],
    "camera_lidar_contrastive": ["contrastive"],
    "image_to_lidar": ["camera", "distill"],
    "scene_two_stage": ["camera", "lidar"],
}
LABELS = {"mae": "lidar MAE alone", "camera_lidar_contrastive": "camera-lidar contrastive",
          "image_to_lidar": "image-to-lidar distillation (teacher: stage-1 camera encoder)",
          "scene_two_stage": "two-stage scene recipe (camera-caption, then lidar MAE + distillation)"}


def run(name: str, steps: int, out: Path, common: list[str]) -> dict:
    folder = out / name
    stages = RECIPES[name]
    overrides = [f"recipe={name}", *[f"recipe.stages.{s}.steps={steps // len(stages)}" for s in stages], *common]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anymodal", "train", "default", "modality=street_scenes", *overrides,
                    "--run-dir", str(folder)], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "anymodal", "eval", str(folder), "--no-pictures"], check=True,
                   capture_output=True, text=True)
    summary = json.loads((folder / "eval" / "results.json").read_text())
    return {"name": name, "seconds": seconds, "summary": summary}


def table(rows: list[dict], classes: list[str]) -> str:
    head = ["encoder", "mIoU", *classes, "street kind (linear probe)", "retrieval R@1 (sample->partner)", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label: str, seg: dict, probe: dict, retrieval: str, seconds: str) -> str:
        ious = ["-" if v is None else f"{100 * v:.1f}" for v in seg["iou"]]
        return (f"| {label} | {100 * seg['miou']:.1f} | " + " | ".join(ious)
                + f" | {100 * probe['linear_probe']:.1f}% | {retrieval} | {seconds} |")

    first = rows[0]["summary"]
    lines.append(line("random init", first["segmentation"]["random init"], first["results"]["random init"], "-", "-"))
    for r in rows:
        trained = next(k for k in r["summary"]["segmentation"] if k != "random init")
        # the partner of each contrastive stage: captions, or the other sensor of the frame
        retrieval = "; ".join(f"{name}: {100 * v['sample_to_partner_r1']:.1f}%" for name, v in r["summary"]["retrieval"].items())
        lines.append(line(LABELS[r["name"]], r["summary"]["segmentation"][trained], r["summary"]["results"][trained],
                          retrieval or "-", f"{r['seconds']:.0f} s"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per recipe (split evenly over stages)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each then uses one thread)")
    p.add_argument("--out", default="runs/scenes")
    p.add_argument("--table", default=str(Path(__file__).parent / "results" / "scenes_cpu.md"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # frames are ray cast on read: each run keeps them in memory, so the steps, not the ray caster, are timed
    common = ["run.progress=false", "run.tensorboard=false", "data.train.cache=true", "data.test.cache=true",
              "eval.max_train=200", "eval.max_test=100",
              "eval.point_samples=512", "eval.retrieval_samples=100", *(["run.threads=1"] if args.jobs > 1 else [])]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda name: run(name, args.steps, out, common), args.recipes))
    classes = [str(c) for c in json.loads((out / args.recipes[0] / "eval" / "results.json").read_text())
               ["segmentation"]["random init"]["iou"]]
    from anymodal.plugins.scenes.data import CLASSES

    text = (f"Street scenes, {args.steps} optimizer steps per recipe, one seed, ViT-Tiny width, 4 blocks; "
            f"segmentation: linear probe on frozen lidar tokens, IoU per class (%), test streets unseen.\n\n"
            + table(rows, list(CLASSES) if len(CLASSES) == len(classes) else classes) + "\n")
    Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
