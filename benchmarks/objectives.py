"""Pre-train the embedded default once per recipe and print the probe table the README shows.

    python benchmarks/objectives.py                 # every recipe below, about 35 min on 2 CPU cores
    python benchmarks/objectives.py mae jepa        # a subset
    python benchmarks/objectives.py --steps 300     # shorter schedules (a smoke run)

Each recipe runs through the real command line (`anymodal train default recipe=<name>`, then
`anymodal eval`) in its own run folder under runs/objectives/, with the wall time measured around
the training command. Results are appended to runs/objectives/results.jsonl and printed as
Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# recipe -> overrides that set its stage lengths to the same total of optimizer steps
RECIPES = {
    "mae": ["recipe.stages.pretrain.steps={steps}"],
    "clip": ["recipe.stages.contrastive.steps={steps}"],
    "jepa": ["recipe.stages.pretrain.steps={steps}"],
    "data2vec": ["recipe.stages.pretrain.steps={steps}"],
    "videoprism": ["recipe.stages.contrastive.steps={half}", "recipe.stages.distill.steps={half}"],
    "umt": ["recipe.stages.align.steps={half}", "recipe.stages.align_contrast.steps={half}"],
}


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anymodal", *cmd], check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per recipe (split evenly over stages)")
    p.add_argument("--out", default="runs/objectives")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.recipes:
        folder = out / name
        overrides = [o.format(steps=args.steps, half=args.steps // 2) for o in RECIPES[name]]
        seconds = run(["train", "default", f"recipe={name}", f"run.name={name}", "run.progress=false", "--run-dir",
                       str(folder), *overrides])
        run(["eval", str(folder), "--no-pictures"])
        summary = json.loads((folder / "eval" / "results.json").read_text())
        row = {"recipe": name, "steps": args.steps, "train_seconds": round(seconds), **summary}
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print("| recipe | linear probe | k-NN | retrieval R@1 (sample->text / text->sample) | train time |")
    print("|---|---|---|---|---|")
    for row in rows:
        trained = next(v for k, v in row["results"].items() if k != "random init")
        r1 = " ; ".join(f"{100 * r['sample_to_partner_r1']:.1f}% / {100 * r['partner_to_sample_r1']:.1f}%"
                        for r in row["retrieval"].values()) or "-"
        print(f"| {row['recipe']} | {100 * trained['linear_probe']:.1f}% | {100 * trained['knn']:.1f}% | {r1} | "
              f"{row['train_seconds']} s |")
    if rows:
        base = rows[0]["results"]["random init"]
        print(f"| random init | {100 * base['linear_probe']:.1f}% | {100 * base['knn']:.1f}% | - | - |")


if __name__ == "__main__":
    main()
