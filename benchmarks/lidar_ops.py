"""Speed of the lidar point ops on one synthetic 120k-point sweep.

Rows: FPS to 512 centres plus kNN grouping of 32 neighbours (`point_patch`'s grouping), and the
full `PillarTokenizer` forward at its default range. Each is timed ``--repeats`` times after a
warm-up and the median is printed as a Markdown table with the machine's name.

    python benchmarks/lidar_ops.py                # CPU, torch's default thread count
    python benchmarks/lidar_ops.py --threads 1    # CPU, one thread
    python benchmarks/lidar_ops.py --gpu          # CUDA, the loop and the Triton kernel side by side

With ``--gpu`` the Triton FPS kernel (`anymodal.tokenizers.fps_kernel`) runs too, first checked
to give the loop's picks on the sweep and on a batch like the `lidar` modality's (128 objects of
1,024 points, 32 centres each).

On a CPU shared with other busy processes, compare ``--threads 1`` too: each FPS step is a few
small ops, and with two OpenMP threads a descheduled worker stalls every op (seen: 139 ms with 2
threads on a quiet 2-core VM, over 30 s on the same VM at load 4.5, 238-299 ms with 1 thread).

The sweep is made with NumPy: a ground plane with range-dependent density (a spinning sensor
samples near ground densely), a few dozen boxes (cars, walls), a tree-like blob or two, uniform
noise, and an intensity channel; it is plausible for timing, not for learning.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from anymodal.tokenizers.point_ops import farthest_point_sample, gather_points, knn_group


def synthetic_sweep(points: int = 120_000, seed: int = 0) -> np.ndarray:
    """A plausible lidar sweep ``[points, 4]`` (x, y, z, intensity) in metres around the sensor."""
    rng = np.random.default_rng(seed)
    n_ground, n_boxes = int(points * 0.6), int(points * 0.3)
    n_noise = points - n_ground - n_boxes
    r = np.exp(rng.uniform(np.log(2.0), np.log(60.0), n_ground))  # denser near the sensor
    a = rng.uniform(-np.pi, np.pi, n_ground)
    ground = np.stack([r * np.cos(a), r * np.sin(a), -1.7 + rng.normal(0, 0.03, n_ground)], 1)
    centres = rng.uniform(-40, 40, (40, 2))
    sizes = rng.uniform([1.5, 1.5, 1.2], [6.0, 3.0, 4.0], (40, 3))
    which = rng.integers(0, 40, n_boxes)
    u = rng.uniform(-0.5, 0.5, (n_boxes, 3))
    face = rng.integers(0, 3, n_boxes)  # put each point on one face of its box
    u[np.arange(n_boxes), face] = np.sign(u[np.arange(n_boxes), face]) * 0.5
    boxes = u * sizes[which]
    boxes[:, :2] += centres[which]
    boxes[:, 2] += -1.7 + sizes[which, 2] / 2
    noise = rng.uniform([-50, -50, -3], [50, 50, 2], (n_noise, 3))
    xyz = np.concatenate([ground, boxes, noise]) + rng.normal(0, 0.01, (points, 3))
    intensity = np.concatenate([rng.uniform(0, 0.3, n_ground), rng.uniform(0.2, 1.0, n_boxes), rng.uniform(0, 1, n_noise)])
    return np.concatenate([xyz, intensity[:, None]], 1).astype(np.float32)[rng.permutation(points)]


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--points", type=int, default=120_000)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    cloud = torch.from_numpy(synthetic_sweep(args.points)).to(device)[None]
    xyz = cloud[..., :3]

    def fps_knn(kernel: str):
        centres = gather_points(xyz, farthest_point_sample(xyz, 512, kernel=kernel))
        return knn_group(xyz, centres, 32)

    fixed_centres = gather_points(xyz, farthest_point_sample(xyz, 512))
    objects = torch.randn(128, 1024, 3, device=device, generator=torch.Generator(device).manual_seed(0))
    kernels = ["torch"] + (["triton"] if args.gpu else [])
    if "triton" in kernels:
        for what, cloud_xyz, num in (("the sweep, 512 picks", xyz, 512), ("128 objects, 32 picks", objects, 32)):
            loop, fused = (farthest_point_sample(cloud_xyz, num, kernel=k) for k in ("torch", "triton"))
            same = int((loop == fused).all(1).sum())
            print(f"{'ok  ' if same == len(loop) else 'FAIL'} triton FPS on {what}: {same} of {len(loop)} clouds "
                  f"pick exactly the loop's points", flush=True)

    from anymodal.tokenizers.pillars import PillarTokenizer

    tokenizer = PillarTokenizer(dim=192).to(device).eval()
    with torch.no_grad():
        tokens = tokenizer(cloud)
        rows = []
        for k in kernels:
            rows += [(f"FPS 512 centres + kNN 32 (FPS: {k})", _median_ms(lambda: fps_knn(k), args.repeats, sync),
                      "< 5" if args.gpu else "< 300"),
                     (f"of which FPS 512 centres ({k})", _median_ms(lambda: farthest_point_sample(xyz, 512, kernel=k), args.repeats, sync), ""),
                     (f"FPS 32 centres of 128 objects x 1,024 points ({k})",
                      _median_ms(lambda: farthest_point_sample(objects, 32, kernel=k), args.repeats, sync), "")]
        rows += [("kNN 32 of 512 centres", _median_ms(lambda: knn_group(xyz, fixed_centres, 32), args.repeats, sync), ""),
                (f"pillar tokenization ({tokens.num_tokens} pillars, grid {tokenizer.grid_size[0]}x{tokenizer.grid_size[1]})",
                 _median_ms(lambda: tokenizer(cloud), args.repeats, sync), "" if args.gpu else "< 50")]
    if args.gpu:
        machine = f"{platform.node()}, {torch.cuda.get_device_name(device)}"
    else:
        machine = f"{platform.node()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}; {args.points} points; median of {args.repeats}")
    print(f"| op | median ms | floor ms ({'H100/H200' if args.gpu else '2 CPU cores'}) |")
    print("|---|---|---|")
    for name, ms, floor in rows:
        print(f"| {name} | {ms:.1f} | {floor} |")


if __name__ == "__main__":
    main()
