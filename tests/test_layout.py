"""The four parts import one way only, and no module imports itself back through another.

core/ (the library) sits below tokenizers/ and objectives/, those below plugins/, and app/ (the
command line, Slurm submission, doctor, scaffolding, experiments) on top. Core reaches components
only through the registry: the plugin manager hands it a `Components`, and core imports no
tokenizer, objective or plugin module. Read from the source with `ast`, imports inside functions
included, so a lazy import cannot hide an arrow that runs backwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("core", "tokenizers", "objectives", "plugins", "app")
# part -> the parts it may import (its own always); core may use the plugin manager, the registry's loader
ALLOWED = {
    "core": {"core"},
    "tokenizers": {"core", "tokenizers"},
    "objectives": {"core", "objectives"},
    "plugins": {"core", "tokenizers", "objectives", "plugins"},
    "app": set(PARTS),
}
CORE_MAY_IMPORT = {"anymodal.plugins.manager"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["anymodal", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for part in PARTS for p in (ROOT / part).rglob("*.py")} | {"anymodal": ROOT / "__init__.py"}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The anymodal modules ``name`` imports: ``from x import y`` counts as ``x.y`` where that is a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    # importing a module runs its parent packages first anyway: an edge to an ancestor is no arrow
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PARTS else None


@pytest.mark.parametrize("part", PARTS)
def test_imports_run_one_way(part: str) -> None:
    wrong = []
    for module, targets in GRAPH.items():
        if _part(module) != part:
            continue
        for target in sorted(targets):
            other = _part(target)
            if other is None or other in ALLOWED[part] or (part == "core" and target in CORE_MAY_IMPORT):
                continue
            wrong.append(f"{module} imports {target}")
    assert not wrong, f"{part}/ may import only {sorted(ALLOWED[part])}:\n" + "\n".join(wrong)


def test_objectives_import_no_tokenizer_and_core_no_modality_code() -> None:
    assert not [(m, t) for m, ts in GRAPH.items() for t in ts
                if _part(m) in ("core", "objectives") and _part(t) == "tokenizers"]


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over the module graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_an_arrow_that_runs_backwards(tmp_path: Path) -> None:
    """The graph is read from real imports: a lazy import inside a function counts."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..tokenizers.text import ByteTextTokenizer\n")
    name = "anymodal.core.probe"
    MODULES[name] = probe
    try:
        assert "anymodal.tokenizers.text" in _imports(name, probe)
    finally:
        del MODULES[name]


def test_each_builtin_modality_is_an_entry_point_plugin_folder() -> None:
    import importlib.metadata

    declared = {ep.name: ep.value for ep in importlib.metadata.distribution("anymodal").entry_points
                if ep.group == "anymodal"}
    for modality in ("image", "video", "lidar", "audio", "text"):
        assert declared.get(modality) == f"anymodal.plugins.{modality}"
        assert (ROOT / "plugins" / modality / "__init__.py").is_file()
    assert declared.get("components") == "anymodal.plugins.components"
    # every folder under plugins/ is a declared plugin: none is loaded by a path of its own
    folders = {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    assert folders <= set(declared), sorted(folders - set(declared))
