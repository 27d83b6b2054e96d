"""Pre-train the embedded default once per recipe and print the probe table the README shows.

    python benchmarks/objectives.py                 # every recipe below, about an hour on 2 CPU cores
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
from pathlib import Path

from anymodal.app.experiment import format_rows, run_variant

# recipe -> overrides that set its stage lengths to the same total of optimizer steps
RECIPES = {
    "mae": ["recipe.stages.pretrain.steps={steps}"],
    "clip": ["recipe.stages.contrastive.steps={steps}"],
    "jepa": ["recipe.stages.pretrain.steps={steps}"],
    "data2vec": ["recipe.stages.pretrain.steps={steps}"],
    "videoprism": ["recipe.stages.contrastive.steps={half}", "recipe.stages.distill.steps={half}"],
    "umt": ["recipe.stages.align.steps={half}", "recipe.stages.align_contrast.steps={half}"],
    # UMT alignment alone: the student's steps; its teacher's 500 contrastive steps come first
    "distill": ["recipe.stages.student.steps={steps}"],
}


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
        overrides = [f"recipe={name}", f"run.name={name}",
                     *[o.format(steps=args.steps, half=args.steps // 2) for o in RECIPES[name]]]
        row = {**run_variant(name, "default", overrides, out / name), "steps": args.steps}
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print(format_rows(rows, ["label"]))


if __name__ == "__main__":
    main()
