"""How vtc's modules import each other: no cycles, and no import hidden in a function unless it
defers a heavy dependency. The layers themselves are import-linter's contract (pyproject.toml,
run by `make test`); this file checks what a layers contract cannot see."""
from __future__ import annotations

import ast
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
# Packages whose import costs seconds on the 2-core machines, or that a command should not need:
# a function-local import of a vtc module that pulls one of them in is how vtc defers it (train.py
# refuses a bad config before lightning is imported; the report imports matplotlib only to plot).
HEAVY = {"lightning", "pytorch_lightning", "mlflow", "matplotlib"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (ROOT / "vtc").rglob("*.py")}


def top_level_imports(name: str) -> set[str]:
    """What importing ``name`` imports at once: its module-level imports (not those under ``if``,
    e.g. TYPE_CHECKING)."""
    out = set()
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def heavy_pulled_in(name: str, seen: frozenset = frozenset()) -> set[str]:
    found = set()
    for imp in top_level_imports(name):
        if imp.split(".")[0] in HEAVY:
            found.add(imp.split(".")[0])
        elif imp in MODULES and imp not in seen and imp != name:
            found |= heavy_pulled_in(imp, seen | {name})
    return found


def function_local_vtc_imports(name: str) -> list[tuple[int, str]]:
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vtc"):
                    out.append((node.lineno, node.module))
    return out


def test_no_import_cycles():
    """Strongly connected components of the import graph (function-local imports included: an
    import moved into a function to dodge a cycle is still a cycle)."""
    graph = grimp.build_graph("vtc")
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_function_local_imports_only_defer_heavy_dependencies():
    hidden = []
    for name in sorted(MODULES):
        host = heavy_pulled_in(name)
        for line, target in function_local_vtc_imports(name):
            if target in MODULES and not heavy_pulled_in(target) - host:
                hidden.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} in a function, "
                              "which defers nothing heavy: import it at the top")
    assert not hidden, "\n".join(hidden)


def test_the_check_is_not_vacuous():
    """The deferral rule sees what it must: train.task defers lightning through vtc.train.module."""
    assert "lightning" in heavy_pulled_in("vtc.train.module")
    assert "lightning" not in heavy_pulled_in("vtc.train.task")
    assert any(t == "vtc.train.module" for _, t in function_local_vtc_imports("vtc.train.task"))
