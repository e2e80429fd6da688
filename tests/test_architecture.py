"""The codebase's rules, checked: declared settings only, small modules, imports flowing one way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "difftool"
#: Variables users expect to set themselves (docs/configuration); every other DIFFTOOL_* variable
#: must be the documented default of a declared option (``Param(env=...)``).
USER_VARIABLES = {"DIFFTOOL_CACHE", "DIFFTOOL_MODELS", "DIFFTOOL_NO_PLUGINS", "DIFFTOOL_MAX_PIXELS",
                  "DIFFTOOL_MAX_INPUT_BYTES", "DIFFTOOL_API_TOKEN"}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def test_no_backend_reads_an_undeclared_difftool_variable() -> None:
    from difftool.plugins.registry import build_registry

    registry = build_registry(entry_points=False)
    declared = {p.env for e in registry.backends.values() for p in e.value.options if p.env}
    declared |= {p.env for e in registry.exporters.values() for p in e.value.options if p.env}
    assert {"DIFFTOOL_ORT_PROVIDER", "DIFFTOOL_TRT_MAX_SIZE", "DIFFTOOL_TRITON_URL"} <= declared
    used = {}
    for name, path in _modules().items():
        for variable in re.findall(r"DIFFTOOL_[A-Z][A-Z0-9_]*", path.read_text()):
            used.setdefault(variable, name)
    undeclared = {v: m for v, m in used.items() if v not in USER_VARIABLES | declared}
    assert not undeclared, f"undeclared environment variables (declare them as a backend option's env): {undeclared}"


def test_no_module_holds_several_jobs() -> None:
    """A newcomer finds things by file name: no module over ~400 lines."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """difftool modules ``path`` imports at run time (anywhere but ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("difftool"):
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            found |= {c for c in candidates if c in modules}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {
        name: {d for d in _runtime_imports(path, set(modules)) if d != name and not name.startswith(d + ".")}
        for name, path in modules.items()
    }
    cycles = []
    for start in graph:  # a cycle through ``start``: a path from one of its imports back to it
        stack, seen = [(d, [start, d]) for d in graph[start]], set()
        while stack:
            node, path = stack.pop()
            if node == start:
                cycles.append(path)
                break
            if node in seen:
                continue
            seen.add(node)
            stack.extend((d, [*path, d]) for d in graph.get(node, ()))
    assert not cycles, cycles[0]


def test_dependencies_flow_one_way() -> None:
    """core imports no GUI, CLI, plugins, exporters or server; exporters import no plugins, CLI or GUI."""
    modules = _modules()
    for name, path in modules.items():
        imports = _runtime_imports(path, set(modules))
        if name.startswith("difftool.core"):
            above = ("gui", "cli", "plugins", "exporters", "api", "plan", "serve")
            bad = {i for i in imports if i.split(".")[1] in above}
            assert not bad, f"{name} imports {bad}"
        if name.startswith("difftool.exporters"):
            bad = {i for i in imports if i.split(".")[1] in ("gui", "cli", "plugins")}
            assert not bad, f"{name} imports {bad}"
