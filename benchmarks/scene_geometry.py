"""Speed of the camera-lidar geometry (`anymodal.core.geometry`) per frame of a six-camera rig.

One synthetic 30k-point sweep (`lidar_ops.synthetic_sweep`), its pillar tokens (`PillarTokenizer`'s
``Tokens.source``: one token per point) and a nuScenes-like rig of six cameras looking 0, +-55,
+-110 and 180 degrees around the ego. Rows, each the median of ``--repeats`` runs after a warm-up:
the calibration check, projection into every camera, patch indexing, the token-to-patch link, and
pooling ``D``-wide patch features per token (the image-to-lidar objective's target). Printed as a
Markdown table with the machine's name and written to ``benchmarks/results/scene_geometry_<device>.md``.

    python benchmarks/scene_geometry.py                  # CPU, torch's default thread count
    python benchmarks/scene_geometry.py --threads 1      # CPU, one thread
    python benchmarks/scene_geometry.py --gpu            # CUDA (synchronized around each run)

On a CPU shared with other busy processes, use ``--threads 1``: these are small elementwise and
index ops, and with two OpenMP threads a descheduled worker stalls each one (seen at load 4 on a
2-core VM: 365 ms per frame with 2 threads, 62 ms with 1).

The default image is 896 x 1600, nuScenes' 900 x 1600 cropped to whole 16-pixel patches, as a
patch embedding would see it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lidar_ops import _median_ms, synthetic_sweep  # noqa: E402  (one timing loop for both)

from anymodal.core.geometry import (check_calibration, link_tokens_to_patches, points_to_patches,  # noqa: E402
                                    pool_patch_features, project_points)
from anymodal.tokenizers.pillars import PillarTokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
YAWS = (0.0, 55.0, -55.0, 110.0, -110.0, 180.0)  # degrees, counter-clockwise from ego +x


def rig(height: int, width: int, frames: int) -> tuple[Tensor, Tensor]:
    """``intrinsics [F, 6, 3, 3]`` and camera-to-ego ``[F, 6, 4, 4]``: OpenCV cameras (z forward, x
    right, y down) 1.6 m up, a 70-degree horizontal field of view, the principal point at the centre."""
    focal = width / 2 / math.tan(math.radians(35))
    k = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=torch.float64)
    cams = []
    for yaw in map(math.radians, YAWS):
        forward = [math.cos(yaw), math.sin(yaw), 0.0]
        right = [math.sin(yaw), -math.cos(yaw), 0.0]
        m = torch.eye(4, dtype=torch.float64)
        m[:3, :3] = torch.tensor([right, [0.0, 0.0, -1.0], forward]).T  # columns: camera x, y, z in ego
        m[:3, 3] = torch.tensor([0.0, 0.0, 1.6])
        cams.append(m)
    return k.expand(frames, len(YAWS), 3, 3).float(), torch.stack(cams).expand(frames, -1, -1, -1).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--points", type=int, default=30_000)
    p.add_argument("--frames", type=int, default=1, help="frames per batch; times are reported per frame")
    p.add_argument("--size", type=int, nargs=2, default=(896, 1600), metavar=("H", "W"))
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dim", type=int, default=384, help="width of the pooled patch features")
    p.add_argument("--out", help="the Markdown file (default: benchmarks/results/scene_geometry_<cpu|cuda>.md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    size, patch_size = tuple(args.size), (args.patch, args.patch)
    num_patches = (size[0] // args.patch) * (size[1] // args.patch)

    sweeps = [torch.from_numpy(synthetic_sweep(args.points, seed=f)) for f in range(args.frames)]
    cloud = torch.stack(sweeps).to(device)
    xyz = cloud[..., :3]
    with torch.no_grad():
        tokens = PillarTokenizer(dim=192).to(device)(cloud)
    source, num_tokens = tokens.source, tokens.num_tokens
    intrinsics, extrinsics = (t.to(device) for t in rig(*size, args.frames))
    features = torch.randn(args.frames, len(YAWS), num_patches, args.dim, device=device)

    proj = project_points(xyz, intrinsics, extrinsics, size)
    patch = points_to_patches(proj, patch_size, size)
    link = link_tokens_to_patches(source, patch, num_tokens, num_patches)
    rows = [
        ("check_calibration", lambda: check_calibration(intrinsics, extrinsics)),
        ("project_points", lambda: project_points(xyz, intrinsics, extrinsics, size)),
        ("points_to_patches", lambda: points_to_patches(proj, patch_size, size)),
        ("link_tokens_to_patches", lambda: link_tokens_to_patches(source, patch, num_tokens, num_patches)),
        (f"pool_patch_features (D={args.dim})", lambda: pool_patch_features(features, link, num_tokens)),
    ]
    with torch.no_grad():
        timed = [(name, _median_ms(fn, args.repeats, sync) / args.frames) for name, fn in rows]

        def everything() -> None:
            check_calibration(intrinsics, extrinsics)
            pr = project_points(xyz, intrinsics, extrinsics, size)
            lk = link_tokens_to_patches(source, points_to_patches(pr, patch_size, size), num_tokens, num_patches)
            pool_patch_features(features, lk, num_tokens)

        timed.append(("all of the above, one after the other", _median_ms(everything, args.repeats, sync) / args.frames))

    if args.gpu:
        machine = f"{platform.node()}, {torch.cuda.get_device_name(device)}"
    else:
        machine = f"{platform.node()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    machine += f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    hits = int(proj.valid.sum())
    lines = [
        f"machine: {machine}; torch {torch.__version__}; median of {args.repeats}, ms per frame "
        f"(batches of {args.frames})",
        f"{args.points} points, {num_tokens} pillar tokens; 6 cameras {size[0]}x{size[1]}, patch {args.patch} "
        f"({num_patches} patches each); {hits} point-camera hits ({hits / args.frames / args.points:.2f} per point), "
        f"{link.weight.numel() // args.frames} (token, camera, patch) links, "
        f"{int(link.covered.sum()) / args.frames:.0f} tokens covered per frame",
        "",
        "| op | ms per frame |",
        "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in timed),
    ]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out) if args.out else RESULTS / f"scene_geometry_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")


if __name__ == "__main__":
    main()
