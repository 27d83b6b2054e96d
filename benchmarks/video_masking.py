"""Step time and peak memory of video pre-training at mask ratios 0 / 0.5 / 0.75 / 0.9.

The step is the long-video recipe's masked-input contrastive step: the encoder runs on the visible
tubelets only, its pooled output is scored against caption embeddings with InfoNCE. The encoder's
cost falls with the mask ratio, which is the point of masking long videos. These are the suite's
``video`` rows (benchmarks/suite.py), printed with the speed-up and memory relative to ratio 0.

    python benchmarks/video_masking.py             # CPU: ViT-Tiny, 8x64x64 clips, batch 8
    python benchmarks/video_masking.py --gpu       # CUDA: ViT-B, 16x224x224 clips, batch 32, bf16
    python benchmarks/video_masking.py --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import ROWS, run_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    rows = run_rows([r for r in ROWS if r["work"] == "video"], args.gpu, args.steps, args.warmup, 3600.0, args.json)
    failed = [r for r in rows if "skipped" in r]
    if failed:
        sys.exit(f"{failed[0]['name']}: {failed[0]['skipped']}")
    base = rows[0]
    print(f"device: {base['device']}, ViT-{base['model']}, batch {base['batch']}, tubelet 2x16x16, {base['precision']}")
    print("| mask ratio | step ms | clips/s | speed-up | peak memory (GiB) | memory vs ratio 0 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['step_ms']} | {r['throughput']} | {base['step_ms'] / r['step_ms']:.2f}x | "
              f"{r['peak_mem_gib']} | {100 * r['peak_mem_gib'] / max(base['peak_mem_gib'], 1e-9):.0f}% |")


if __name__ == "__main__":
    main()
