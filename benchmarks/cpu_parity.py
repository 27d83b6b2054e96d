"""anymodal against the timm-built peer on a CPU, step for step in one process.

On a small shared VM, timings of separate processes (as `suite.py` runs its rows) drift by 10-20%
from minute to minute, more than the difference being measured. Here both implementations are
built side by side and their training steps (fwd + bwd + AdamW) alternate, so drift hits both
alike; each pair is run in both orders (whichever runs second in a pair gains a little from warm
caches) and the ratio of medians is reported per order.

    python benchmarks/cpu_parity.py                 # mae-B, dense-B, dense-L at the suite's CPU sizes
    python benchmarks/cpu_parity.py --steps 40 --json parity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402  (benchmarks/ is not a package)

WORKLOADS = [("mae", "base"), ("dense", "base"), ("dense", "large")]


def train_step(work: str, size: str, impl: str) -> Callable[[], None]:
    torch.manual_seed(0)
    loss_fn, model, _, _ = suite.build_step({"work": work, "impl": impl, "size": size}, torch.device("cpu"), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def compare(work: str, size: str, steps: int, warmup: int) -> dict[str, Any]:
    steps_by = {impl: train_step(work, size, impl) for impl in ("anymodal", "timm")}
    for step in steps_by.values():
        for _ in range(warmup):
            step()
    out: dict[str, Any] = {"work": work, "size": suite.SHAPES[(work, size)]["cpu"][0]}
    for order in (("anymodal", "timm"), ("timm", "anymodal")):
        times: dict[str, list[float]] = {impl: [] for impl in order}
        for _ in range(steps):
            for impl in order:
                start = time.perf_counter()
                steps_by[impl]()
                times[impl].append(time.perf_counter() - start)
        med = {impl: statistics.median(t) for impl, t in times.items()}
        key = f"{order[0]}_first"
        out[key] = {"anymodal_ms": round(1000 * med["anymodal"], 1), "timm_ms": round(1000 * med["timm"], 1),
                    "ratio": round(med["anymodal"] / med["timm"], 3)}
    out["ratio_mean"] = round((out["anymodal_first"]["ratio"] + out["timm_first"]["ratio"]) / 2, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    rows = [compare(work, size, args.steps, args.warmup) for work, size in WORKLOADS]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| step (fwd+bwd+AdamW) | anymodal / timm, anymodal first | timm first | mean |")
    print("|---|---|---|---|")
    for r in rows:
        a, t = r["anymodal_first"], r["timm_first"]
        print(f"| {r['work']} ({r['size']}) | {a['anymodal_ms']} / {a['timm_ms']} ms = {a['ratio']}x | "
              f"{t['anymodal_ms']} / {t['timm_ms']} ms = {t['ratio']}x | {r['ratio_mean']}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
