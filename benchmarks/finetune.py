"""Linear probe against fine-tuning against training from scratch, per modality, as measured.

    python benchmarks/finetune.py                       # every modality below
    python benchmarks/finetune.py image audio           # a subset
    python benchmarks/finetune.py --pretrain-steps 50 --finetune-steps 20   # a smoke run

For each modality, through the real command line in runs/finetune/<modality>/: MAE pre-training of
the embedded default's ViT-Tiny (`anymodal train default modality=<m>`), `anymodal eval` (the linear
probe of the frozen encoder), `anymodal finetune` (the pre-trained encoder end to end), and
`anymodal finetune finetune.init=scratch` (the same fine-tuning, the same steps, from random
weights). Test accuracy of each, and the wall time of each command, go to --json and print as
Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# modality -> overrides of the pre-training run (each modality file sets its data and batch size)
MODALITIES = {
    "image": ["modality=image"],
    "video": ["modality=video"],
    "lidar": ["modality=lidar"],
    "audio": ["modality=audio"],
}
DATA = {"image": "MNIST digits", "video": "moving digits (the digit)", "lidar": "shapes, 10 classes",
        "audio": "spoken digits, unseen voices"}


def _cli(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anymodal", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"anymodal {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def measure(name: str, out: Path, pretrain_steps: int, finetune: list[str]) -> dict:
    run = out / name
    row: dict = {"modality": name, "data": DATA[name], "pretrain_steps": pretrain_steps, "finetune": finetune}
    if not (run / "export" / "backbone.safetensors").is_file():
        row["pretrain_s"] = _cli("train", "default", *MODALITIES[name], f"recipe.stages.pretrain.steps={pretrain_steps}",
                                 "run.progress=false", "--run-dir", str(run))
    row["eval_s"] = _cli("eval", str(run), "--no-pictures")
    probe = json.loads((run / "eval" / "results.json").read_text())["results"]
    row["linear_probe"] = next(v["linear_probe"] for k, v in probe.items() if k.startswith("pre-trained"))
    row["linear_probe_random"] = probe["random init"]["linear_probe"]
    for init in ("pretrained", "scratch"):
        folder = run / f"finetune-{init}"
        row[f"{init}_s"] = _cli("finetune", str(run), "--out", str(folder), f"finetune.init={init}", *finetune,
                                *(["--resume"] if (folder / "checkpoints" / "last.pt").is_file() else []))
        result = json.loads((folder / "results.json").read_text())
        row[f"finetune_{init}"] = result["test"]["accuracy"]
        row[f"finetune_{init}_val"] = result["val"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| modality (data) | linear probe (random init) | fine-tuned | from scratch, same fine-tuning |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['modality']} ({r['data']}) | {100 * r['linear_probe']:.1f}% ({100 * r['linear_probe_random']:.1f}%) | "
                     f"{100 * r['finetune_pretrained']:.1f}% | {100 * r['finetune_scratch']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modalities", nargs="*", default=list(MODALITIES), help=", ".join(MODALITIES))
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    unknown = sorted(set(args.modalities) - set(MODALITIES))
    if unknown:
        p.error(f"unknown modalities {unknown}; choose from {list(MODALITIES)}")
    finetune = [f"finetune.steps={args.finetune_steps}", f"finetune.eval_every={max(1, args.finetune_steps // 4)}",
                "finetune.checkpoint_every=100"]
    rows = [measure(m, Path(args.out), args.pretrain_steps, finetune) for m in args.modalities]
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": "2-core CPU VM, no GPU", "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
