"""The runnable examples of README.md and of every docs/*.md page run as written.

A code block after ``<!-- docs-test: file PATH -->`` is written to PATH in a fresh folder (one per
page and ``###`` section); a block after ``<!-- docs-test: run -->`` is run there line by line
(``anymodal`` as ``python -m anymodal``, ``python -m anymodal.<module>`` as written, ``python SCRIPT.py`` for a
script a block of the section wrote, the folder on PYTHONPATH, entry-point autoload off so only
what the docs show is loaded). The sensor plugin shown must be the example package's code, byte for
byte. The README stays a front door (under 250 lines), and its links into docs/ name pages that exist.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
BLOCK = re.compile(r"<!-- docs-test: (file (?P<path>\S+)|run) -->\n```\w*\n(?P<body>.*?)```", re.S)
MARKER = re.compile(r"<!-- docs-test:")
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(#(?P<anchor>[^)\s]*))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces as -."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def runnable_sections() -> dict[tuple[str, str], list[tuple[str | None, str]]]:
    """(page, ``###`` section title) -> its marked blocks in order, as (file path or None for run, body)."""
    sections: dict[tuple[str, str], list[tuple[str | None, str]]] = {}
    for page in PAGES:
        for part in re.split(r"^### ", page.read_text(), flags=re.M)[1:]:
            title = part.splitlines()[0].strip()
            blocks = [(m["path"], m["body"]) for m in BLOCK.finditer(part.split("\n## ")[0])]
            if blocks:
                assert (page_name(page), title) not in sections, f"two sections {title!r} in {page_name(page)}"
                sections[(page_name(page), title)] = blocks
    return sections


SECTIONS = runnable_sections()


def section(title: str) -> list[tuple[str | None, str]]:
    """The one runnable section with this title, on whichever page it is."""
    found = [blocks for (_, t), blocks in SECTIONS.items() if t == title]
    assert len(found) == 1, f"{len(found)} runnable sections titled {title!r}: {sorted(SECTIONS)}"
    return found[0]


def test_docs_have_runnable_examples() -> None:
    titles = {title for _, title in SECTIONS}
    assert {"Write a sensor plugin", "Add an objective", "A config file of your own"} <= titles, sorted(SECTIONS)
    for key, blocks in SECTIONS.items():
        assert any(path is None for path, _ in blocks), f"section {key!r} has files but nothing that runs them"


def test_every_marker_is_read() -> None:
    # a marker outside a ### section, or not directly followed by a fenced block, would silently not run
    for page in PAGES:
        text = page.read_text()
        parsed = sum(len(BLOCK.findall(part.split("\n## ")[0])) for part in re.split(r"^### ", text, flags=re.M)[1:])
        assert len(MARKER.findall(text)) == parsed, f"{page_name(page)}: a docs-test marker that is not run"


def test_sensor_plugin_in_docs_is_the_example() -> None:
    shown = dict(section("Write a sensor plugin"))["anymodal_radar/__init__.py"]
    assert shown == (ROOT / "examples" / "anymodal-radar" / "anymodal_radar" / "__init__.py").read_text()


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_links_to_local_files_exist(page: Path) -> None:
    # every relative link (README -> docs/..., docs -> ../README.md or a sibling page) names a real file
    for match in LINK.finditer(page.read_text()):
        target = match["target"]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        assert (page.parent / target).exists(), f"{page_name(page)} links to {target}, which does not exist"
        if match["anchor"] and target.endswith(".md"):
            assert match["anchor"] in anchors(page.parent / target), f"{page_name(page)} links to {match[0]}: no such heading"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / m["target"]).resolve() for m in LINK.finditer(README.read_text())}
    assert {p.resolve() for p in PAGES[1:]} <= linked, "a docs/ page the README does not link to"


@pytest.mark.parametrize("key", sorted(SECTIONS), ids=lambda key: f"{key[0]}: {key[1]}")
def test_section_runs(key: tuple[str, str], tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p),
               ANYMODAL_DISABLE_PLUGIN_AUTOLOAD="1")
    for path, body in SECTIONS[key]:
        if path is not None:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(body)
            continue
        for line in filter(None, (line.split("#")[0].strip() for line in body.splitlines())):
            args = shlex.split(line)
            if args[:2] == ["python", "-m"] and args[2].split(".")[0] == "anymodal":  # a module's own tool
                args = args[2:]
            if args[0] == "python" and len(args) == 2 and (tmp_path / args[1]).is_file():  # a script the page wrote
                command = [sys.executable, args[1]]
            else:
                assert args[0].split(".")[0] == "anymodal", \
                    f"docs run block in {key!r} runs {args[0]!r}; only anymodal commands and modules are run"
                command = [sys.executable, "-m", *args]
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"


# ---- commands shown but too long to run here ------------------------------------------------------
# A full-length run (`anymodal train default`, a Slurm job) cannot run in the suite. Each shown
# `anymodal` line is still held to what it claims: its config resolves and validates, the run folder
# an eval/export/--resume line names is the one a train line on that page writes, and a shown
# transcript (`$ command` then its output) is what the command prints today.

FENCE = re.compile(r"(?P<marker><!-- docs-test:[^\n]*-->\n)?```\w*\n(?P<body>.*?)```", re.S)
NEEDS_RUN_FOLDER = ("eval", "export", "finetune")


def shown_commands() -> list[tuple[str, list[str], list[str]]]:
    """(page, anymodal arguments, the output lines shown after it when it is a ``$`` transcript line)."""
    shown = []
    for page in PAGES:
        for fence in FENCE.finditer(page.read_text()):
            if fence["marker"]:
                continue
            lines = fence["body"].replace("\\\n", " ").splitlines()
            printed: set[int] = set()  # lines a transcript shows as output, not commands
            for i, line in enumerate(lines):
                transcript = line.startswith("$ ")
                output = list(itertools.takewhile(lambda x: not x.startswith("$ "), lines[i + 1:])) if transcript else []
                printed.update(range(i + 1, i + 1 + len(output)))
                if i in printed:
                    continue
                for part in line.removeprefix("$ ").split("#")[0].split("&&"):
                    words = shlex.split(part)
                    starts = [j for j, w in enumerate(words) if w == "anymodal" and (j == 0 or words[j - 1] == "-m")
                              and not words[j + 1:j + 2] == [] and not words[j + 1].endswith(":")]  # "anymodal cmd: error" is output
                    if starts:
                        shown.append((page_name(page), words[starts[0] + 1:], output))
    return shown


SHOWN = shown_commands()


def _in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from anymodal.app.cli import main

    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _as_config(args: list[str]) -> list[str]:
    """`train`/`submit` arguments as the `config` command that resolves the same config."""
    kept, rest = [], iter(args[1:])
    for word in rest:
        if word in ("--run-dir",):
            next(rest)
        elif word == "--sweep":
            key, values = next(rest).split("=", 1)
            kept.append(f"{key}={values.split(',')[0]}")
        elif not word.startswith("--"):
            kept.append(word)
    return ["config", *kept]


def test_every_page_shows_its_commands() -> None:
    pages = {page for page, _, _ in SHOWN}
    assert {"README.md", "docs/training.md", "docs/scale-out.md", "docs/recipes.md"} <= pages, sorted(pages)


@pytest.mark.parametrize("page", sorted({page for page, _, _ in SHOWN}))
def test_shown_commands_hold(page: str, capsys: pytest.CaptureFixture) -> None:
    from omegaconf import OmegaConf

    written: set[str] = set()
    for _, args, output in [s for s in SHOWN if s[0] == page]:
        line = "anymodal " + " ".join(args)
        if output:  # a transcript: the command prints what the page shows
            code, _, err = _in_process(args, capsys)
            assert err.splitlines() == [o for o in output if o.strip()], f"{page}: {line}\n{err}"
            continue
        if args[0] in ("train", "submit") and "--resume" not in args:
            code, out, err = _in_process(_as_config(args), capsys)
            assert code == 0, f"{page}: {line}\n{err}"
            run = OmegaConf.create(out).run
            written.add(args[args.index("--run-dir") + 1] if "--run-dir" in args else f"{run.out_dir}/{run.name}")
        elif args[0] in NEEDS_RUN_FOLDER or "--resume" in args:
            assert args[0] == "train" or args[1] in written, f"{page}: {line} names a run folder no train line writes"
        elif args[0] in ("config", "plugins", "doctor"):
            code, _, err = _in_process(args, capsys)
            assert code == 0, f"{page}: {line}\n{err}"
        elif args[0] == "shards":  # `shards write CONFIG ... --out DIR`: its config resolves
            kept, words = [], iter(args[2:])
            for word in words:
                if word in ("--out", "--split", "--shard-size", "--workers"):
                    next(words, None)
                elif not word.startswith("--"):
                    kept.append(word)
            code, _, err = _in_process(["config", *kept], capsys)
            assert args[1] == "write" and code == 0, f"{page}: {line}\n{err}"
        elif args[0] == "demo":  # `train default` then `eval`: the train lines check that config
            assert args == ["demo"], f"{page}: {line}"
        else:
            pytest.fail(f"{page}: {line}: no check for this command")


def test_recipe_excerpt_is_the_shipped_recipe() -> None:
    from omegaconf import OmegaConf

    excerpts = [m["body"] for m in re.finditer(r"```yaml\n(?P<body>.*?)```", (ROOT / "docs" / "recipes.md").read_text(), re.S)]
    shown = OmegaConf.create(excerpts[0])
    shipped = OmegaConf.load(ROOT / "configs" / "recipe" / f"{shown.recipe.name}.yaml")
    # the page leaves keys out but changes none: merging it onto the file changes nothing
    assert OmegaConf.to_container(OmegaConf.merge(shipped, shown)) == OmegaConf.to_container(shipped)
