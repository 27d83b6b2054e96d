"""Peak memory and step time of video MAE pre-training at mask ratios 0 / 0.5 / 0.75 / 0.9.

The encoder runs on the visible tubelets only, so its cost falls with the mask ratio (the point
of masked pre-training on long videos). Each ratio runs in a fresh process so peak memory is its
own: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the growth of the process's peak RSS over
its footprint after building the model (``ru_maxrss``).

    python benchmarks/video_masking.py                     # CPU: ViT-Tiny, 8x64x64 clips, batch 8
    python benchmarks/video_masking.py --gpu               # CUDA: ViT-B, 16x224x224, batch 16, bf16
    python benchmarks/video_masking.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

RATIOS = (0.0, 0.5, 0.75, 0.9)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(ratio: float, gpu: bool, steps: int, warmup: int) -> dict:
    import torch

    from anymodal.core.backbone import Backbone
    from anymodal.core.encoder import ENCODER_SIZES, Encoder
    from anymodal.core.masking import Mask, RandomMasker
    from anymodal.core.objective import Batch
    from anymodal.core.posenc import build_posenc
    from anymodal.objectives.masked_pixel import MaskedPixel
    from anymodal.tokenizers.video import TubeletTokenizer

    device = torch.device("cuda" if gpu else "cpu")
    size, frames, side, batch = ("base", 16, 224, 16) if gpu else ("tiny", 8, 64, 8)
    dim, depth, heads = ENCODER_SIZES[size]
    tokenizer = TubeletTokenizer(dim, frames=frames, image_size=side, tubelet=(2, 16, 16), channels=3)
    student = Backbone(tokenizer, Encoder(dim, depth, heads, build_posenc("sincos", dim, 3))).to(device)
    objective = MaskedPixel(dim, tokenizer, decoder_dim=512 if gpu else 128, decoder_depth=8 if gpu else 2,
                            decoder_heads=16 if gpu else 4).to(device)
    params = list(student.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    masker = RandomMasker(ratio) if ratio > 0 else None
    video = torch.rand(batch, 3, frames, side, side, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    base_rss = _peak_rss_bytes()
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    def step(g: torch.Generator) -> None:
        with autocast:
            tokens = student.tokenize({"video": video})
            if masker is None:  # no masking: the encoder sees every token, the decoder predicts all
                n = tokens.num_tokens
                index = torch.arange(n, device=device).expand(batch, -1)
                mask = Mask(index, index)
            else:
                mask = masker(tokens, g)
            loss = objective(Batch({"video": video}, tokens, mask, g), student).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        step(g)
    times = []
    for _ in range(steps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(g)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if gpu else _peak_rss_bytes() - base_rss
    ms = 1000 * statistics.median(times)
    return {"mask_ratio": ratio, "device": torch.cuda.get_device_name() if gpu else "cpu", "model": size,
            "clip": f"{frames}x{side}x{side}", "batch": batch, "step_ms": round(ms, 1),
            "clips_per_s": round(batch / (ms / 1000), 1), "peak_mem_mib": round(peak / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child process: measure one ratio
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.gpu, args.steps, args.warmup)))
        return
    rows = []
    for ratio in RATIOS:
        cmd = [sys.executable, __file__, "--one", str(ratio), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd + (["--gpu"] if args.gpu else []), capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"device: {base['device']}, ViT-{base['model']}, clips {base['clip']}, batch {base['batch']}, tubelet 2x16x16")
    print("| mask ratio | step ms | clips/s | speed-up | peak memory (MiB) | memory vs ratio 0 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask_ratio']} | {r['step_ms']} | {r['clips_per_s']} | {base['step_ms'] / r['step_ms']:.2f}x | "
              f"{r['peak_mem_mib']} | {100 * r['peak_mem_mib'] / max(base['peak_mem_mib'], 1e-9):.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
