"""What ``anymodal doctor`` says about an optional package, for any plugin's ``report_environment``:
present with its version, or missing with the pip command that brings it (the anymodal extra that
requires it, read from anymodal's own metadata, as an editable install in a clone)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Optional

__all__ = ["package_status", "install_command", "source_checkout"]


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


def package_status(module: str, dist: str, command: Optional[str] = None) -> str:
    """``"present   <version>"``, or ``"missing   <pip command>"`` (``command`` if given, else the
    anymodal extra that requires ``dist``, else ``pip install <dist>``). Found without importing it."""
    if importlib.util.find_spec(module) is None:
        extra = None if command else _extra_for(dist)
        need = command or (install_command(extra, source_checkout(), Path.cwd()) if extra else f"pip install {dist}")
        return f"missing   {need}"
    try:
        return f"present   {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return "present   (version unknown)"
