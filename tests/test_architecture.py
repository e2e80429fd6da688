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


#: What each layer may import besides itself (type-only imports included): core is the bottom floor; the ONNX
#: exporters stand on core; the runtimes (ONNX Runtime, TensorRT, Triton) on the exporters' files; plugins on
#: all three; the app (plan, api, folder jobs, executors) on plugins. Front ends (cli, commands, gui, serve)
#: sit on top, and ``testing`` beside them.
ALLOWED_BELOW = {
    "core": set(),
    "exporters": {"core"},
    "runtimes": {"core", "exporters"},
    "plugins": {"core", "exporters", "runtimes"},
    "app": {"core", "exporters", "runtimes", "plugins", "training"},
}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """difftool modules ``path`` imports, lazily or not, ``if TYPE_CHECKING:`` blocks included (a type-only
    import is still an arrow of the design, and a run-time one the day someone needs the name at run time)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("difftool"):
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            found |= {c for c in candidates if c in modules}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {
            d
            for d in _imports(path, set(modules))
            if d != name and not name.startswith(d + ".")  # a package's __init__ runs first anyway
        }
        for name, path in modules.items()
    }


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    """No circle among difftool's modules, counting imports made only for type checking."""
    circles = _circles(_graph())
    assert not circles, circles


def test_no_arrow_runs_up_a_layer() -> None:
    """core imports only core, the exporters only core, the runtimes only those two, plugins no app or front
    end, the app no front end (cli, commands, gui, serve): type-only imports included."""
    wrong = []
    for name, imports in _graph().items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in ALLOWED_BELOW:
            continue
        allowed = ALLOWED_BELOW[layer] | {layer}
        wrong += [f"{name} -> {i}" for i in sorted(imports) if i.count(".") and i.split(".")[1] not in allowed]
    assert not wrong, wrong
