"""The README's runnable examples run as written.

A code block after ``<!-- docs-test: file PATH -->`` is written to PATH in a fresh folder (one per
``###`` section); a block after ``<!-- docs-test: run -->`` is run there line by line (``anymodal``
as ``python -m anymodal``, the folder on PYTHONPATH, entry-point autoload off so only what the
docs show is loaded). The sensor plugin shown must be the example package's code, byte for byte.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- docs-test: (file (?P<path>\S+)|run) -->\n```\w*\n(?P<body>.*?)```", re.S)


def runnable_sections() -> dict[str, list[tuple[str | None, str]]]:
    """``###`` section title -> its marked blocks in order, as (file path or None for run, body)."""
    sections: dict[str, list[tuple[str | None, str]]] = {}
    for part in re.split(r"^### ", README.read_text(), flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = [(m["path"], m["body"]) for m in BLOCK.finditer(part.split("\n## ")[0])]
        if blocks:
            sections[title] = blocks
    return sections


SECTIONS = runnable_sections()


def test_docs_have_runnable_examples() -> None:
    assert {"Write a sensor plugin", "Add an objective", "A config file of your own"} <= set(SECTIONS), sorted(SECTIONS)
    for title, blocks in SECTIONS.items():
        assert any(path is None for path, _ in blocks), f"section {title!r} has files but nothing that runs them"


def test_sensor_plugin_in_docs_is_the_example() -> None:
    shown = dict(SECTIONS["Write a sensor plugin"])["anymodal_radar/__init__.py"]
    assert shown == (ROOT / "examples" / "anymodal-radar" / "anymodal_radar" / "__init__.py").read_text()


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_section_runs(title: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p),
               ANYMODAL_DISABLE_PLUGIN_AUTOLOAD="1")
    for path, body in SECTIONS[title]:
        if path is not None:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(body)
            continue
        for line in filter(None, (line.split("#")[0].strip() for line in body.splitlines())):
            args = shlex.split(line)
            assert args[0] == "anymodal", f"docs run block in {title!r} runs {args[0]!r}; only anymodal commands are run"
            proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                                  timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
