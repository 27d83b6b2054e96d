"""Farthest point sampling as one Triton kernel: all picks of all clouds in a single launch.

The loop in `point_ops.farthest_point_sample` launches about fifteen small kernels per pick, so
on a GPU its time is launch latency (512 picks: thousands of launches). Here each cloud is split
into ``P`` contiguous slices, one program each; a program keeps its slice's running distances,
and after every pick the ``P`` programs of a cloud agree on the next one through a counter in
global memory (a grid barrier), each having posted its slice's best candidate. The barrier needs
all ``P`` programs resident at once, so ``P * B`` never exceeds the number of SMs; with one
program per cloud (small clouds, big batches) there is no barrier at all.

Same picks as the loop: same float32 distances, taken points marked -0.5, padding -1, ties to
the lowest index (within a tile by ``argmax``, across tiles and slices by strict comparison in
index order).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

TILE = 1024  # points a program handles per inner step

_triton = None


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel():
    """Compile-on-first-use, so importing anymodal never needs Triton."""
    global _triton
    if _triton is None:
        import triton
        import triton.language as tl

        @triton.jit
        def fps(coords_ptr, dist_ptr, start_ptr, picks_ptr, part_val_ptr, part_idx_ptr, counter_ptr,
                batch, width, num, slice_len, P: tl.constexpr, TILE: tl.constexpr):
            p = tl.program_id(0)
            b = tl.program_id(1)
            row = b * width  # this cloud's row in dist and in each coordinate plane
            plane = batch * width
            parts = b * 2 * P
            far = tl.load(start_ptr + b).to(tl.int32)
            for i in range(num):
                tl.store(picks_ptr + b * num + i, far.to(tl.int64), mask=p == 0)
                cx = tl.load(coords_ptr + row + far)
                cy = tl.load(coords_ptr + plane + row + far)
                cz = tl.load(coords_ptr + 2 * plane + row + far)
                best_val = tl.full([], -2.0, tl.float32)
                best_idx = tl.full([], 0, tl.int32)
                for t in range(0, slice_len, TILE):
                    offs = p * slice_len + t + tl.arange(0, TILE)
                    dx = tl.load(coords_ptr + row + offs) - cx
                    dy = tl.load(coords_ptr + plane + row + offs) - cy
                    dz = tl.load(coords_ptr + 2 * plane + row + offs) - cz
                    d = dx * dx + dy * dy + dz * dz
                    dist = tl.minimum(tl.load(dist_ptr + row + offs), d)
                    dist = tl.where(offs == far, -0.5, dist)
                    tl.store(dist_ptr + row + offs, dist)
                    m = tl.max(dist, 0)
                    a = tl.argmax(dist, 0)
                    better = m > best_val
                    best_idx = tl.where(better, p * slice_len + t + a, best_idx)
                    best_val = tl.where(better, m, best_val)
                if P == 1:
                    far = best_idx
                else:
                    slot = parts + (i % 2) * P  # two slots: a fast program may post pick i+1 while others read pick i
                    tl.store(part_val_ptr + slot + p, best_val)
                    tl.store(part_idx_ptr + slot + p, best_idx)
                    tl.debug_barrier()
                    tl.atomic_add(counter_ptr + b, 1, sem="release")
                    arrived = tl.atomic_add(counter_ptr + b, 0, sem="acquire")
                    while arrived < (i + 1) * P:
                        arrived = tl.atomic_add(counter_ptr + b, 0, sem="acquire")
                    lanes = tl.arange(0, P)
                    vals = tl.load(part_val_ptr + slot + lanes, volatile=True)
                    idxs = tl.load(part_idx_ptr + slot + lanes, volatile=True)
                    far = tl.sum(tl.where(lanes == tl.argmax(vals, 0), idxs, 0))

        _triton = fps
    return _triton


def programs_per_cloud(batch: int, points: int, device: torch.device) -> int:
    """A power of two, at most one program per ``TILE`` points, and ``P * batch`` within the SMs."""
    if device.type != "cuda":  # Triton's interpreter runs programs one after another: no barrier
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cap = max(1, min(sms // batch, -(-points // TILE)))
    return 1 << (cap.bit_length() - 1)


def fps_triton(coords: Tensor, dist: Tensor, start: Tensor, num: int) -> Tensor:
    """Picks ``[B, num]`` from ``coords [3, B, N]`` (float32) and the initial running distances
    ``dist [B, N]`` (inf for points, -1 for padding); ``start [B]`` is each cloud's first pick."""
    if not coords.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"farthest_point_sample(kernel='triton') runs on CUDA tensors, got {coords.device} "
                         "(set TRITON_INTERPRET=1 to run Triton's interpreter on a CPU, slowly)")
    if not available():
        raise ImportError("farthest_point_sample(kernel='triton') needs the triton package (it comes with CUDA torch)")
    _, b, n = coords.shape
    p = programs_per_cloud(b, n, coords.device)
    slice_len = -(-n // (p * TILE)) * TILE
    width = p * slice_len
    coords = torch.nn.functional.pad(coords, (0, width - n)).contiguous()  # copies only when pad did not
    dist = torch.nn.functional.pad(dist, (0, width - n), value=-1.0)
    picks = torch.empty(b, num, dtype=torch.long, device=coords.device)
    part_val = torch.empty(b, 2, p, dtype=torch.float32, device=coords.device)
    part_idx = torch.empty(b, 2, p, dtype=torch.int32, device=coords.device)
    counter = torch.zeros(b, dtype=torch.int32, device=coords.device)
    _kernel()[(p, b)](coords, dist, start.contiguous(), picks, part_val, part_idx, counter,
                      b, width, num, slice_len, P=p, TILE=TILE, num_warps=4)
    return picks
