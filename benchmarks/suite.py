"""The performance suite: anymodal's training steps next to the same steps built from timm modules,
in one run on one machine. Prints a Markdown table and writes JSON.

    python benchmarks/suite.py                        # CPU: scaled-down sizes, a few minutes
    python benchmarks/suite.py --gpu                  # CUDA: ViT-B/L at 224, video ViT-B 16x224x224
    python benchmarks/suite.py --gpu --only mae       # rows whose name contains "mae"
    python benchmarks/suite.py --json out.json --budget 480

Each row runs in a fresh process (its own peak memory, its own compile caches): the median step
time over timed steps after warm-up (synchronized on CUDA), throughput, peak memory (CUDA:
``max_memory_allocated``; CPU: the growth of peak RSS over the footprint after building), and
on CUDA the model FLOP utilization: FLOPs of one eager fwd+bwd counted by torch's
``FlopCounterMode``, over the step time, over a bf16 8192^3 matmul measured at the start of the run.
Rows run in the order listed (most important first); ``--budget`` seconds skips the rest.

Workloads (CPU sizes in parentheses):
  dense  ViT-B/16 and ViT-L/16 at 224 (tiny at 112), fwd+bwd+AdamW, cross-entropy on the class token
  mae    ViT-B/16, 75% random mask, 8x512 decoder (tiny, 4x128 decoder)
  video  ViT-B, 16x224x224 clips (tiny, 8x64x64), tubelet 2x16x16: the encoder on the visible
         tubelets only, pooled, InfoNCE against caption embeddings (the long-video recipe's
         masked-input contrastive step), mask ratio 0 / 0.5 / 0.75 / 0.9
  modality  each built-in modality's own config (`anymodal train default modality=X recipe=mae`,
         model=base on CUDA): the MAE step on a real batch of its data (lidar_sweep: the pillar
         sweep step), and next to it the data loader alone, as the trainer builds it (workers,
         pinned memory on CUDA, persistent workers, prefetch), in samples/s; a loader slower
         than the step starves it
  options on the dense ViT-B step: SDPA kernel, fp32, unfused AdamW, activation checkpointing,
         xformers (when installed), and torch.compile for both implementations
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent

# name: workload, implementation, options. Sizes and batches per device are in SHAPES.
ROWS: list[dict[str, Any]] = [
    # the floors first (MAE vs the peer eager and compiled, ViT-L MFU, video masking), then the rest
    {"name": "mae-B anymodal", "work": "mae", "impl": "anymodal", "size": "base"},
    {"name": "mae-B timm", "work": "mae", "impl": "timm", "size": "base"},
    {"name": "mae-B anymodal compile full", "work": "mae", "impl": "anymodal", "size": "base", "compile": "full"},
    {"name": "mae-B timm compile", "work": "mae", "impl": "timm", "size": "base", "compile": "full"},
    {"name": "dense-L anymodal", "work": "dense", "impl": "anymodal", "size": "large"},
    {"name": "dense-L anymodal compile full", "work": "dense", "impl": "anymodal", "size": "large", "compile": "full"},
    {"name": "dense-L timm", "work": "dense", "impl": "timm", "size": "large"},
    # MFU grows with the work per kernel: twice the batch (about 50 GiB on an 80 GB card)
    {"name": "dense-L anymodal compile full, 2x batch", "work": "dense", "impl": "anymodal", "size": "large",
     "compile": "full", "batch_scale": 2},
    *[{"name": f"video-B mask {r}", "work": "video", "impl": "anymodal", "size": "base", "ratio": r}
      for r in (0.0, 0.5, 0.75, 0.9)],
    {"name": "mae-B anymodal compile", "work": "mae", "impl": "anymodal", "size": "base", "compile": "blocks"},
    {"name": "mae-B anymodal compile objectives", "work": "mae", "impl": "anymodal", "size": "base", "compile": "objectives"},
    {"name": "mae-B anymodal compile full cudagraphs", "work": "mae", "impl": "anymodal", "size": "base", "compile": "full",
     "cuda_graphs": True, "gpu_only": True},
    *[{"name": f"{m} mae step + loader", "work": "modality", "impl": "anymodal", "size": "base", "modality": m}
      for m in ("image", "video", "lidar", "lidar_sweep", "audio")],
    # the scene lidar step on frames generated on read, then on the same streets read back from AV log
    # formats (written once into the data cache by the scenes plugin's exporters): does reading keep up?
    *[{"name": f"street_scenes {source} lidar mae step + loader", "work": "modality", "impl": "anymodal", "size": "base",
       "modality": "street_scenes", "source": source} for source in ("generated", "mcap", "nuscenes")],
    # the same steps reading data.train from shards (anymodal shards write, 64 MB shards, written once into
    # the data cache): on local disk, and on an S3 server on localhost (moto) fetched into an empty cache;
    # their loaders read a whole epoch of MNIST / 400 sweeps, fetches included
    *[{"name": f"{m} mae step + loader, {where} shards", "work": "modality", "impl": "anymodal", "size": "base",
       "modality": m, "source": where, "loader_batches": batches}
      for m, batches in (("image", 234), ("lidar_sweep", 50)) for where in ("local", "s3")],
    # ragged sweeps packed into one sequence through xformers' block-diagonal kernel, against the padded row above
    {"name": "lidar_sweep mae step, xformers packed", "work": "modality", "impl": "anymodal", "size": "base",
     "modality": "lidar_sweep", "overrides": ["model.attn_backend=xformers"], "gpu_only": True},
    {"name": "dense-B anymodal", "work": "dense", "impl": "anymodal", "size": "base"},
    {"name": "dense-B timm", "work": "dense", "impl": "timm", "size": "base"},
    {"name": "dense-B anymodal compile", "work": "dense", "impl": "anymodal", "size": "base", "compile": "blocks"},
    {"name": "dense-B timm compile", "work": "dense", "impl": "timm", "size": "base", "compile": "full"},
    *[{"name": f"dense-B anymodal sdpa={k}", "work": "dense", "impl": "anymodal", "size": "base", "sdpa": k,
       "gpu_only": k != "math"} for k in ("flash", "cudnn", "efficient", "math")],
    {"name": "dense-B anymodal xformers", "work": "dense", "impl": "anymodal", "size": "base", "attn": "xformers",
     "gpu_only": True},
    {"name": "dense-B anymodal fp32", "work": "dense", "impl": "anymodal", "size": "base", "precision": "fp32"},
    {"name": "dense-B anymodal unfused AdamW", "work": "dense", "impl": "anymodal", "size": "base", "fused": False},
    {"name": "dense-B anymodal grad ckpt", "work": "dense", "impl": "anymodal", "size": "base", "ckpt": True},
    {"name": "dense-L anymodal compile", "work": "dense", "impl": "anymodal", "size": "large", "compile": "blocks"},
]

# (gpu, cpu): encoder size, image side / (frames, side), batch
SHAPES = {
    ("dense", "base"): {"gpu": ("base", 224, 256), "cpu": ("tiny", 112, 16)},
    ("dense", "large"): {"gpu": ("large", 224, 128), "cpu": ("small", 112, 8)},
    ("mae", "base"): {"gpu": ("base", 224, 512), "cpu": ("tiny", 112, 32)},
    ("video", "base"): {"gpu": ("base", (16, 224), 32), "cpu": ("tiny", (8, 64), 8)},
}
DECODER = {"gpu": (512, 8, 16), "cpu": (128, 4, 4)}  # MAE decoder width, depth, heads
LOADER_WORKERS = {"gpu": 8, "cpu": 2}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_ceiling_tflops() -> float:
    """bf16 8192^3 matmul throughput on random data: the MFU denominator."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1000) / 1e12


def build_step(row: dict[str, Any], device: Any, dev: str) -> tuple[Callable[[], Any], Any, int, str]:
    """(eager loss function, model, batch, unit) for one row."""
    import torch

    from anymodal.core.backbone import Backbone
    from anymodal.core.encoder import ENCODER_SIZES, Encoder
    from anymodal.core.posenc import build_posenc
    from anymodal.tokenizers.image import ImagePatchTokenizer

    if row["work"] == "modality":
        return modality_step(row, device, dev)
    size, geometry, batch = SHAPES[(row["work"], row["size"])][dev]
    batch = row.get("batch_scale", 1) * batch
    dim, depth, heads = ENCODER_SIZES[size]
    gen = torch.Generator(device=device).manual_seed(0)
    attn = row.get("attn", "sdpa")

    def image_backbone(side: int) -> Backbone:
        tokenizer = ImagePatchTokenizer(dim, image_size=side, patch_size=16, channels=3)
        posenc = build_posenc("learned", dim, 2, tokenizer.grid_size)  # timm's ViT learns its table too
        encoder = Encoder(dim, depth, heads, posenc, attn_backend=attn, grad_checkpointing=row.get("ckpt", False))
        tokenizer.make_targets = row["work"] == "mae"  # as the trainer sets it: only reconstruction reads targets
        return Backbone(tokenizer, encoder, pool="cls")

    if row["work"] == "dense":
        side = geometry
        images = torch.randn(batch, 3, side, side, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        if row["impl"] == "timm":
            from peer import timm_vit

            model = timm_vit(size, side).to(device)
            if row.get("ckpt"):
                model.set_grad_checkpointing(True)
            forward = model
        else:
            backbone = image_backbone(side)
            head = torch.nn.Linear(dim, 1000)
            model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
            forward = lambda x: head(backbone.embed({"image": x}))  # noqa: E731
        return lambda: torch.nn.functional.cross_entropy(forward(images), labels), model, batch, "img/s"

    if row["work"] == "mae":
        side = geometry
        images = torch.randn(batch, 3, side, side, device=device)
        ddim, ddepth, dheads = DECODER[dev]
        if row["impl"] == "timm":
            from peer import TimmMae

            model = TimmMae(dim, depth, heads, side, 16, ddim, ddepth, dheads).to(device)
            return lambda: model(images), model, batch, "img/s"
        from anymodal.core.masking import RandomMasker
        from anymodal.core.objective import Batch
        from anymodal.objectives.masked_pixel import MaskedPixel

        backbone = image_backbone(side)
        objective = MaskedPixel(dim, backbone.tokenizer, ddim, ddepth, dheads)
        model = torch.nn.ModuleDict({"backbone": backbone, "objective": objective}).to(device)
        masker = RandomMasker(0.75)

        def mae_loss() -> Any:
            tokens = backbone.tokenize({"image": images})
            return objective(Batch({"image": images}, tokens, masker(tokens, gen), gen), backbone).loss
        return mae_loss, model, batch, "img/s"

    # video: masked-input contrastive step
    from anymodal.core.masking import RandomMasker
    from anymodal.objectives.contrastive import info_nce
    from anymodal.tokenizers.video import TubeletTokenizer

    frames, side = geometry
    tokenizer = TubeletTokenizer(dim, frames=frames, image_size=side, tubelet=(2, 16, 16), channels=3)
    tokenizer.make_targets = False  # a contrastive step reads no reconstruction targets
    backbone = Backbone(tokenizer, Encoder(dim, depth, heads, build_posenc("sincos", dim, 3), attn_backend=attn))
    proj = torch.nn.Linear(dim, 512)
    model = torch.nn.ModuleDict({"backbone": backbone, "proj": proj}).to(device)
    video = torch.rand(batch, 3, frames, side, side, device=device)
    # the caption side: embeddings of a frozen text tower, whose cost does not depend on the mask
    captions = torch.nn.functional.normalize(torch.randn(batch, 512, device=device, generator=gen), dim=-1)
    masker = RandomMasker(row["ratio"]) if row["ratio"] > 0 else None

    def video_loss() -> Any:
        tokens = backbone.tokenize({"video": video})
        index = None if masker is None else masker(tokens, gen).visible
        pooled = backbone.pool(backbone.encode(tokens, index))
        return info_nce(torch.nn.functional.normalize(proj(pooled), dim=-1), captions, torch.tensor(1 / 0.07))
    return video_loss, model, batch, "clip/s"


@functools.lru_cache(maxsize=None)  # the step, the loader and the row's label share one build
def _modality_parts(modality: str, dev: str, extra: tuple[str, ...] = ()) -> tuple[Any, Any, Any, Any]:
    """Config, components, backbone and training dataset of ``anymodal train default modality=X recipe=mae``
    (and ``extra`` overrides)."""
    from anymodal.core.build import build_backbone, build_dataset, build_transforms
    from anymodal.app.cli import load_config
    from anymodal.core.data import AugmentedDataset

    overrides = [f"modality={modality}", "recipe=mae"] + (["model=base"] if dev == "gpu" else []) + list(extra)
    composed, components = load_config("default", overrides)
    cfg = composed.cfg
    backbone = build_backbone(cfg, components)
    key = backbone.tokenizer.input_key
    dataset = AugmentedDataset(build_dataset(cfg, "train", components), build_transforms(cfg, components), key, 0)
    return cfg, components, backbone, dataset


def _row_parts(row: dict[str, Any], dev: str) -> tuple[Any, Any, Any, Any]:
    return _modality_parts(row["modality"], dev,
                           tuple(row.get("overrides", ())) + _source_overrides(row["modality"], row.get("source")))


@functools.lru_cache(maxsize=None)
def _source_overrides(modality: str, source: str | None) -> tuple[str, ...]:
    """``data.train`` of a scene row: the generated streets (cached in memory after the first read,
    as a run that reads each frame many times would), or 64 frames of them exported once as MCAP
    recordings or a nuScenes folder, read back from disk."""
    if source in (None, "generated"):
        return ("data.train.cache=true",) if source else ()
    if source in ("local", "s3"):
        from shards import local_shards, s3_shards  # benchmarks/shards.py

        folder = local_shards(modality)
        path = s3_shards(folder, modality) if source == "s3" else str(folder)
        return (f"data.train={{_replace_: true, name: shards, path: '{path}'}}",)
    from anymodal.core.data import cache_dir
    from anymodal.plugins.scenes.export import export_mcap, export_nuscenes

    folder = Path(cache_dir("benchmarks", f"street_scenes_{source}"))
    if not (folder / "done").exists():
        if source == "mcap":
            export_mcap(folder, "train", streets=8, frames_per_street=8)
        else:
            export_nuscenes(folder, frames_per_street=8)
        (folder / "done").touch()
    node = f"{{name: mcap_scenes, path: '{folder}'}}" if source == "mcap" else f"{{name: nuscenes, root: '{folder}'}}"
    return (f"data.train={node}",)


def modality_step(row: dict[str, Any], device: Any, dev: str) -> tuple[Callable[[], Any], Any, int, str]:
    """A modality's MAE training step, exactly as the trainer runs it, on one batch of its data."""
    import torch

    from anymodal.core.build import build_masker, build_objectives
    from anymodal.core.data import make_loader
    from anymodal.core.trainer import StepForward

    cfg, components, backbone, dataset = _row_parts(row, dev)
    stage = cfg.recipe.stages.pretrain
    objectives, weights = build_objectives(stage, components, backbone)
    model = StepForward(backbone, objectives, weights).to(device)
    masker = build_masker(stage, components)
    raw = next(iter(make_loader(dataset, cfg.data.batch_size, seed=0)))
    raw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    gen = torch.Generator().manual_seed(0)
    return lambda: model(raw, masker, gen, None)[0], model, cfg.data.batch_size, "samples/s"


def loader_throughput(row: dict[str, Any], dev: str, batches: int = 20) -> float:
    """Samples/s of the trainer's loader alone, after its workers have started and filled the queue once."""
    from anymodal.core.data import make_loader

    cfg, _, _, dataset = _row_parts(row, dev)
    loader = iter(make_loader(dataset, cfg.data.batch_size, seed=0, num_workers=LOADER_WORKERS[dev], pin_memory=dev == "gpu"))
    for _ in range(3):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * cfg.data.batch_size / (time.perf_counter() - start)


def _compiled(row: dict[str, Any], model: Any, loss_fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    from anymodal.core.device import compile_blocks

    mode = row.get("compile")
    options = {"mode": "reduce-overhead"} if row.get("cuda_graphs") else {}  # run.cuda_graphs=true
    if mode == "blocks":  # what run.compile=blocks does in the trainer
        compile_blocks(model, **options)
    elif mode == "objectives":  # what run.compile=objectives does: the objective's forward, not tokenize/mask
        model["objective"].compile(**options)
    elif mode == "full":  # the whole step as one graph (a peer user's torch.compile(model))
        return torch.compile(loss_fn, **options)
    return loss_fn


def measure(row: dict[str, Any], gpu: bool, steps: int, warmup: int, ceiling: float, profile: bool = False) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from anymodal.core.device import sdpa_kernels

    dev = "gpu" if gpu else "cpu"
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    if row.get("attn") == "xformers":
        from anymodal.core.attention import check_backend

        check_backend("xformers")  # ImportError -> the row is reported as skipped
    loss_fn, model, batch, unit = build_step(row, device, dev)
    params = list(model.parameters())
    # fused AdamW on CUDA unless the row turns it off; off means the per-parameter loop
    if row.get("fused", True) is False:
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True if gpu else None)
    precision = row.get("precision", "bf16" if gpu else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        if row.get("cuda_graphs"):
            torch.compiler.cudagraph_mark_step_begin()
        with autocast, sdpa_kernels(row.get("sdpa", "auto")):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base_rss = _peak_rss_bytes()
    with FlopCounterMode(display=False) as counter:  # counted eagerly: compiling keeps the arithmetic
        with autocast, sdpa_kernels(row.get("sdpa", "auto")):
            loss = loss_fn()
        loss.backward()
    flops = counter.get_total_flops()
    flop_counts = counter.get_flop_counts()
    opt.zero_grad(set_to_none=True)
    loss_fn = _compiled(row, model, loss_fn)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if gpu else _peak_rss_bytes() - base_rss
    sec = statistics.median(times)
    if row["work"] == "modality":
        from anymodal.core.build import encoder_shape

        model_cfg = _row_parts(row, dev)[0].model
        model_name = f"{model_cfg.size}, {encoder_shape(model_cfg)[1]} blocks"
    else:
        model_name = SHAPES[(row["work"], row["size"])][dev][0]
    out = {**row, "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
           "model": model_name, "batch": batch, "precision": precision,
           "step_ms": round(1000 * sec, 2), "throughput": round(batch / sec, 1), "unit": unit,
           "peak_mem_gib": round(peak / 2**30, 3), "warmup_s": round(warm_s, 1)}
    if row["work"] == "modality" and not row.get("overrides"):  # a variant's loader is its modality row's
        out["loader_throughput"] = round(loader_throughput(row, dev, row.get("loader_batches", 20)), 1)
        out["loader_workers"] = LOADER_WORKERS[dev]
    if profile:
        from step_profile import flops_by_category, profile_step

        out["profile"] = profile_step(step, gpu, sec, flops_by_category(flop_counts), ceiling)
    if flops:
        out["tflop_per_step"] = round(flops / 1e12, 4)
        out["achieved_tflops"] = round(flops / sec / 1e12, 2)
        if ceiling:
            out["mfu"] = round(flops / sec / 1e12 / ceiling, 4)
    return out


def run_rows(rows: list[dict[str, Any]], gpu: bool, steps: int, warmup: int, budget: float,
             json_path: str | None, profile: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    ceiling = matmul_ceiling_tflops() if gpu else 0.0
    if gpu:
        print(f"bf16 8192^3 matmul: {ceiling:.0f} TFLOP/s", flush=True)
    start, results = time.perf_counter(), []
    for row in rows:
        if time.perf_counter() - start > budget:
            results.append({**row, "skipped": f"over the {budget:.0f} s budget"})
            continue
        if row.get("gpu_only") and not gpu:  # CUDA kernels, or CUDA graphs: nothing to time on a CPU
            results.append({**row, "skipped": "CUDA only"})
            continue
        cmd = [sys.executable, __file__, "--one", json.dumps(row), "--steps", str(steps), "--warmup", str(warmup),
               "--ceiling", str(ceiling)] + (["--gpu"] if gpu else [])
        if any(_selects(pattern, row["name"]) for pattern in profile):
            cmd.append("--profile-this")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget - (time.perf_counter() - start), 30))
        except subprocess.TimeoutExpired:
            results.append({**row, "skipped": "timed out"})
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({**row, "skipped": reason[:200]})
        print(json.dumps(results[-1]), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps({"matmul_tflops": ceiling, "rows": results}, indent=2))
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | batch | step ms | throughput | MFU | peak mem GiB | loader alone |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | - | - | skipped: {r['skipped']} | - | - | - |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        loader = f"{r['loader_throughput']:,} {r['unit']} ({r['loader_workers']} workers)" if "loader_throughput" in r else "-"
        lines.append(f"| {r['name']} ({r['model']}) | {r['batch']} | {r['step_ms']} | {r['throughput']:,} {r['unit']} | "
                     f"{mfu} | {r['peak_mem_gib']} | {loader} |")
    return "\n".join(lines)


def _selects(pattern: str, name: str) -> bool:
    """An exact row name selects that row alone; any other text selects the rows containing it."""
    exact = any(r["name"] == pattern for r in ROWS)
    return name == pattern if exact else pattern in name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--only", action="append", default=[], help="a row's exact name, or text that selects the rows containing it (repeatable)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=float, default=3600.0, help="seconds; rows after it are skipped")
    p.add_argument("--json")
    p.add_argument("--profile", action="append", default=[],
                   help="rows to profile as well (selected as by --only): where their step time goes")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: one row, as JSON
    p.add_argument("--ceiling", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--profile-this", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))  # peer.py
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.gpu, args.steps, args.warmup, args.ceiling, args.profile_this)))
        return
    rows = [r for r in ROWS if not args.only or any(_selects(s, r["name"]) for s in args.only)]
    results = run_rows(rows, args.gpu, args.steps, args.warmup, args.budget, args.json, tuple(args.profile))
    print(format_table(results))
    from step_profile import format_profile

    for r in results:
        if "profile" in r:
            print(format_profile(r["name"], r["profile"]))


if __name__ == "__main__":
    main()
