"""The layout rules the architecture relies on, checked on the source (no imports run).

- ``hilora_core`` is pure algorithm and model code: it never imports ``registry`` or ``deployments``;
  ``registry`` never imports ``deployments`` (data flows one way).
- No two modules of the three packages import each other.
- No module of the three packages is over 400 lines (split by responsibility before that).
- No file of the project edits ``sys.path`` (the packages, benchmarks and examples are installed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hilora_core", "registry", "deployments")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from .x import y`` resolved; ``y`` counted when a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def test_data_flows_one_way_and_no_two_modules_import_each_other():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    mutual = sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph[b])
    assert not mutual, f"modules that import each other: {mutual}"
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if (a.startswith("hilora_core") and not b.startswith("hilora_core"))
                    or (a.startswith("registry") and b.startswith("deployments")))
    assert not upward, f"imports against the data flow: {upward}"


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_file_edits_sys_path():
    skip = {".venv", ".git", "build", "dist"}
    edits = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
             if not skip & set(p.relative_to(ROOT).parts) and "sys.path" in p.read_text(errors="ignore")
             and p != Path(__file__)]
    assert not edits, f"files that edit sys.path: {edits}"
