"""``anymodal doctor``: the environment a run would see, as text to paste into a bug report.

Python, torch and CUDA, the optional extras present or missing (found without importing them), what
each plugin reports of its own needs (``report_environment``), the registered plugins with their
versions, and the entry-point plugins that failed to load and why.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from .. import __version__
from ..plugins.environment import package_status
from ..plugins.manager import load_components

__all__ = ["EXTRAS", "doctor_report"]

# the optional packages the modality-free core uses; each modality's plugin reports its own
# (``report_environment``). The pip extra that brings each is read from anymodal's metadata.
EXTRAS = {"timm": "timm", "xformers": "xformers", "tensorboard": "tensorboard", "submitit": "submitit",
          "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}
# timm without its dependencies, as scripts/install.sh does: its torchvision requirement would
# replace a CPU torch (anymodal.core.timm_compat supplies what timm needs from torchvision)
COMMANDS = {"timm": 'pip install --no-deps "timm>=1.0,<2"', "submitit": "pip install submitit"}


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
    for module, dist in EXTRAS.items():
        lines.append(f"  {module:<18} {package_status(module, dist, COMMANDS.get(module))}")
    components = load_components(skip_broken=True)
    assert components.manager is not None
    for found in components.manager.hook.report_environment():  # what plugins need beyond imports
        lines += [f"  {label:<18} {status}" for label, status in (found or {}).items()]
    lines.append("plugins:")
    for name, origin in components.plugins.items():
        counts = ", ".join(f"{len([e for e in r if e.plugin == name])} {kind}s" for kind, r in components.registries.items())
        lines.append(f"  {name:<18} {origin}: {counts}")
    lines.append("entry points that failed to load:" if components.failed else "entry points that failed to load: none")
    lines += [f"  {name:<18} {why}" for name, why in components.failed.items()]
    return "\n".join(lines)
