"""The package structure docs/architecture.md describes, checked against the code.

- every import between two packages of megacredit runs down the floors (lazy imports too);
- no two modules import each other in a loop;
- no module of the package is there only for the tests;
- docs/architecture.md lists exactly the package's files (their line counts within 30 % or 40
  lines), and trainer/ stays within 1,500 lines.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megacredit"
FLOORS = {
    "cli": 6, "recipes": 6,
    "trainer": 5,
    "reporting": 4, "planning": 4,
    "config": 3, "megatron": 3,
    "rollout": 2, "data": 2, "envs": 2, "algorithms": 2, "models": 2,
    "utils": 1,
}
"""A package may import packages on lower floors only (docs/architecture.md's table)."""
TRAINER_MAX_LINES = 1500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "megacredit"


def internal_imports(path: Path) -> set[str]:
    """Every megacredit module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("megacredit.")}


def module_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = defaultdict(set)
    for name, path in modules.items():
        for target in internal_imports(path):
            if target in modules and target != name:
                graph[name].add(target)
    return {name: graph[name] for name in modules}


def test_imports_run_down_the_floors():
    graph = module_graph()
    assert set(FLOORS) == {package_of(m) for m in graph if package_of(m) != "megacredit"}, \
        "a package was added or removed: give it a floor here and in docs/architecture.md"
    upward = [f"{source} -> {target}" for source, targets in graph.items() for target in targets
              if package_of(source) != package_of(target) and package_of(target) != "megacredit"
              and FLOORS[package_of(target)] >= FLOORS[package_of(source)]]
    assert not upward, "imports that do not run down the floors:\n" + "\n".join(sorted(upward))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert strongly_connected(module_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_there_only_for_the_tests():
    """Each module is imported by another module of the package, by tools/ or benchmarks/, or
    is an entry point (``python -m ...``, the console script, a lazily imported command)."""
    graph = module_graph()
    imported = {target for targets in graph.values() for target in targets}
    for folder in ("tools", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            imported |= internal_imports(path)
    named_in_code = " ".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    named_in_code += (REPO / "pyproject.toml").read_text()
    unused = []
    for name in graph:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        entry_point = path.is_file() and '__name__ == "__main__"' in path.read_text()
        lazily_named = re.search(rf"[\"']{re.escape(name)}[\"':]", named_in_code) is not None
        parent_package = any(other.startswith(name + ".") for other in graph)
        if name not in imported and not (entry_point or lazily_named or parent_package or name == "megacredit"):
            unused.append(name)
    assert not unused, f"modules nothing in the package, tools/ or benchmarks/ imports: {unused}"


def documented_files() -> dict[str, int]:
    text = (REPO / "docs" / "architecture.md").read_text()
    return {path: int(lines) for path, lines in re.findall(r"^\| `(megacredit/[^`]+\.py)` \| (\d+) \|", text, re.M)}


def test_architecture_doc_lists_every_file_of_the_package():
    documented = documented_files()
    actual = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sorted(documented) == sorted(actual), "docs/architecture.md's file list differs from the tree"
    stale = {path: (documented[path], lines) for path, lines in actual.items()
             if abs(lines - documented[path]) > max(40, 0.3 * documented[path])}
    assert not stale, f"line counts in docs/architecture.md out of date (documented, actual): {stale}"


def test_trainer_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in (PACKAGE / "trainer").glob("*.py"))
    assert lines <= TRAINER_MAX_LINES, f"megacredit/trainer/ holds {lines} lines (at most {TRAINER_MAX_LINES})"
