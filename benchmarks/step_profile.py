"""Where a training step's time goes, from torch's profiler: the time per step of the GPU kernels
(on CPU, of the operators' own work) grouped into matrix multiplies, attention, the optimizer,
copies and the rest (norms, activations, fused elementwise kernels), with what the matmuls and
the attention achieve (their FLOPs from the FLOP counter over their time). On GPU, the step time
no kernel covers is launch and host overhead; on CPU, the time outside every operator is Python and
the autograd engine. This is what says why a step's MFU is what it is.

Shares are of the profiled steps' own wall time, so with the gap they add up to 100% however busy
the machine was; the un-profiled median step time is reported next to it (the profiler's overhead
and the machine's load make the two differ).
"""

from __future__ import annotations

from typing import Any, Callable

# first match wins: attention kernels often carry GEMM words in their names (cutlass, gemm)
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer", ("adam", "multi_tensor", "_foreach")),
    ("copy", ("memcpy", "memset", "aten::copy_")),
)
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


def category(name: str) -> str:
    lowered = name.lower()
    for label, words in CATEGORIES:
        if any(word in lowered for word in words):
            return label
    return "other"


def flops_by_category(flop_counts: dict[str, dict[Any, int]]) -> dict[str, int]:
    """Matmul and attention FLOPs from ``FlopCounterMode.get_flop_counts()``."""
    out = {"matmul": 0, "attention": 0}
    for op, count in flop_counts.get("Global", {}).items():
        name = str(op).split(".")[-1]
        if name in MATMUL_OPS:
            out["matmul"] += count
        elif "attention" in name:
            out["attention"] += count
    return out


def profile_step(step: Callable[[], None], gpu: bool, step_s: float, flops: dict[str, int],
                 ceiling_tflops: float = 0.0, steps: int = 5) -> dict[str, Any]:
    """Profile ``steps`` calls of a warmed-up ``step``; ``step_s`` is its timed (un-profiled) median.

    Returns ``step_ms`` (the profiled steps' mean wall time), ``timed_step_ms``, ``categories``
    (label -> ``ms`` and ``share`` of ``step_ms``, and TFLOP/s where FLOPs are known), ``gap``
    (the time no kernel, on CPU no operator, covers: ``ms`` and ``share``) and the ``top`` kernels.
    """
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
        step_ms = 1000 * (time.perf_counter() - start) / steps
    times_us: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for name, own, label in _own_times(prof, gpu):
        times_us[label] = times_us.get(label, 0.0) + own
        kernels[name] = kernels.get(name, 0.0) + own
    per_step_ms = {label: us / steps / 1000 for label, us in times_us.items()}
    result: dict[str, Any] = {"step_ms": round(step_ms, 2), "timed_step_ms": round(1000 * step_s, 2), "categories": {}}
    for label in [c for c, _ in CATEGORIES] + ["other"]:
        ms = per_step_ms.get(label, 0.0)
        entry: dict[str, Any] = {"ms": round(ms, 2), "share": round(ms / step_ms, 4)}
        if flops.get(label) and ms > 0:
            entry["tflops"] = round(flops[label] / (ms / 1000) / 1e12, 1)
            if ceiling_tflops:
                entry["of_ceiling"] = round(entry["tflops"] / ceiling_tflops, 3)
        result["categories"][label] = entry
    # on GPU the host (Python, launches) holding the device up; on CPU Python and the autograd engine
    gap_ms = max(step_ms - sum(per_step_ms.values()), 0.0)
    result["gap"] = {"label": "no kernel" if gpu else "no operator", "ms": round(gap_ms, 2), "share": round(gap_ms / step_ms, 4)}
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    result["top"] = [{"name": name[:90], "ms": round(us / steps / 1000, 2)} for name, us in top]
    return result


def _own_times(prof: Any, gpu: bool) -> list[tuple[str, float, str]]:
    """(name, own microseconds, category) of each GPU kernel, or on CPU of each aten operator
    (an operator under the optimizer's step counts as the optimizer: on CPU AdamW is plain aten ops)."""
    import torch

    if gpu:
        return [(e.key, e.self_device_time_total, category(e.key)) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    out = []
    for e in prof.events():
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        parent, label = e.cpu_parent, category(e.name)
        while parent is not None:
            if parent.name.startswith("Optimizer.step"):
                label = "optimizer"
                break
            parent = parent.cpu_parent
        out.append((e.name, e.self_cpu_time_total, label))
    return out


def format_profile(name: str, p: dict[str, Any]) -> str:
    lines = [f"where the time of '{name}' goes ({p['step_ms']} ms per profiled step, {p['timed_step_ms']} ms timed without the profiler):"]
    for label, entry in p["categories"].items():
        extra = ""
        if "tflops" in entry:
            extra = f", {entry['tflops']} TFLOP/s" + (f" ({100 * entry['of_ceiling']:.0f}% of the matmul ceiling)"
                                                       if "of_ceiling" in entry else "")
        lines.append(f"  {label:<11} {entry['ms']:>8.2f} ms  {100 * entry['share']:5.1f}%{extra}")
    gap = p["gap"]
    lines.append(f"  {gap['label']:<11} {gap['ms']:>8.2f} ms  {100 * gap['share']:5.1f}%")
    lines.append("  top: " + "; ".join(f"{t['name']} {t['ms']} ms" for t in p["top"][:5]))
    return "\n".join(lines)
