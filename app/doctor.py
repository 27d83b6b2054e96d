"""``anymodal doctor``: the environment a run would see, as text to paste into a bug report.

Python, torch and CUDA, the optional extras present or missing (found without importing them), what
each plugin reports of its own needs (``report_environment``), the registered plugins with their
versions, and the entry-point plugins that failed to load and why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..plugins.manager import load_components

__all__ = ["EXTRAS", "doctor_report", "source_checkout", "install_command"]

# import name -> distribution; the pip extra that brings each is read from anymodal's own metadata
# (pyproject's optional-dependencies), so it is named in one place
EXTRAS = {"timm": "timm", "av": "av", "laspy": "laspy", "xformers": "xformers", "torchaudio": "torchaudio",
          "tensorboard": "tensorboard", "submitit": "submitit"}
# timm without its dependencies, as scripts/install.sh does: its torchvision requirement would
# replace a CPU torch (anymodal.core.timm_compat supplies what timm needs from torchvision)
COMMANDS = {"timm": 'pip install --no-deps "timm>=1.0,<2"', "submitit": "pip install submitit"}


def source_checkout() -> Optional[Path]:
    """The clone this anymodal runs from (``pip install -e .``, or the clone on ``sys.path``), or
    None for an installed package. The import package is the clone's root folder (pyproject's
    ``package-dir``), so a clone is a package folder that holds ``pyproject.toml``."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def install_command(extra: str, checkout: Optional[Path], cwd: Path) -> str:
    """The pip command that adds an optional-dependencies ``extra``: to the clone in editable mode
    (``"."`` when ``cwd`` is the clone), or to the installed package."""
    if checkout is None:
        return f'pip install "anymodal[{extra}]"'
    where = "." if checkout.resolve() == cwd.resolve() else str(checkout)
    return f'pip install -e "{where}[{extra}]"'


def _extra_for(dist: str) -> Optional[str]:
    """The optional-dependencies extra of anymodal that requires ``dist`` (not the dev one), or None."""
    try:
        requires = importlib.metadata.requires("anymodal") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        name, _, marker = req.partition(";")
        extra = marker.split("extra ==")[-1].strip().strip("\"'") if "extra ==" in marker else None
        if extra and extra != "dev" and re.split(r"[\[<>=!~ ]", name.strip(), maxsplit=1)[0] == dist:
            return extra
    return None


def _extra_line(module: str, dist: str, need: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"  {module:<18} missing   {need}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return f"  {module:<18} present   {version}"


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
    checkout, cwd = source_checkout(), Path.cwd()
    for module, dist in EXTRAS.items():
        extra = None if module in COMMANDS else _extra_for(dist)
        need = COMMANDS.get(module) or (install_command(extra, checkout, cwd) if extra else f"pip install {dist}")
        lines.append(_extra_line(module, dist, need))
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
