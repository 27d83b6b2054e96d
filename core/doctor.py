"""``anymodal doctor``: the environment a run would see, as text to paste into a bug report.

Python, torch and CUDA, the optional extras present or missing (found without importing them), the
registered plugins with their versions, and the entry-point plugins that failed to load and why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

import torch

from .. import __version__
from ..plugins.manager import load_components

__all__ = ["EXTRAS", "doctor_report"]

# import name -> (distribution, how to get it); the extras are pyproject's optional-dependencies
EXTRAS = {
    "timm": ("timm", "pip install anymodal[timm]"),
    "av": ("av", "pip install anymodal[video]"),
    "laspy": ("laspy", "pip install anymodal[lidar]"),
    "xformers": ("xformers", "pip install anymodal[xformers]"),
    "torchaudio": ("torchaudio", "pip install anymodal[audio]"),
    "tensorboard": ("tensorboard", "pip install anymodal[tensorboard]"),
    "submitit": ("submitit", "pip install submitit"),
}


def _extra_line(module: str, dist: str, need: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"  {module:<18} missing   {need}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return f"  {module:<18} present   {version}"


def _clip_vocab_line() -> str:
    from ..tokenizers.text import find_clip_vocab

    try:
        return f"  {'open_clip vocab':<18} present   {find_clip_vocab()}"
    except FileNotFoundError:
        return f"  {'open_clip vocab':<18} missing   for clip_bpe: pip install --no-deps open-clip-torch"


def _cuda_lines() -> list[str]:
    if not torch.cuda.is_available():
        return [f"cuda: not available (torch built for CUDA {torch.version.cuda or 'none'})"]
    lines = [f"cuda: available, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"]
    lines += [f"  cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return lines


def doctor_report() -> str:
    """The report as text; never raises for a broken plugin (it is listed under failed plugins)."""
    lines = [f"anymodal {__version__} ({Path(__file__).resolve().parent.parent})",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}", *_cuda_lines(), "optional extras:"]
    lines += [_extra_line(module, dist, need) for module, (dist, need) in EXTRAS.items()]
    lines.append(_clip_vocab_line())
    components = load_components(skip_broken=True)
    lines.append("plugins:")
    for name, origin in components.plugins.items():
        counts = ", ".join(f"{len([e for e in r if e.plugin == name])} {kind}s" for kind, r in components.registries.items())
        lines.append(f"  {name:<18} {origin}: {counts}")
    lines.append("entry points that failed to load:" if components.failed else "entry points that failed to load: none")
    lines += [f"  {name:<18} {why}" for name, why in components.failed.items()]
    return "\n".join(lines)
