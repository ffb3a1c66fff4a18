"""The shape of the code, in figures: modules, import arrows, layers, cycles, Prefect below flows/, trainer spread.

    python scripts/layout.py            # this checkout
    python scripts/layout.py --root DIR # another checkout (e.g. an older commit, `git archive` into DIR)

Every `import` counts, including those inside functions (a lazy import is still an arrow a reader must follow).
A cycle is a strongly connected group of two or more modules. Layers: the longest import chain (cycles
collapsed). "Trainer spread" counts the files under flywheel/ and flows/ that name a trainer ("rloo") as a
string: the places a new trainer would touch.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("flywheel", "flows")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, known: set[str]) -> set[str]:
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = modules or [base]  # `from pkg import module` is an arrow to the module, not to pkg itself
        for t in targets:
            while t and t not in known:  # `from pkg import name`: the module pkg.name if it is one, else pkg
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph: dict[str, set[str]]) -> int:
    depth: dict[str, int] = {}

    def d(v: str, seen: frozenset) -> int:
        if v in depth:
            return depth[v]
        below = [d(w, seen | {v}) for w in graph[v] if w not in seen]
        depth[v] = 1 + max(below, default=0)
        return depth[v]

    return max((d(v, frozenset()) for v in graph), default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    root = p.parse_args().root.resolve()
    files = {module_name(root, f): f for pkg in PACKAGES for f in sorted((root / pkg).rglob("*.py"))}
    known = set(files)
    graph = {m: imports_of(root, f, known) for m, f in files.items()}
    lib = [m for m in files if m.startswith("flywheel")]
    prefect = sorted(m for m in lib if "prefect" in {n.split(".")[0] for n in _all_imports(files[m])})
    trainer = sorted(str(f.relative_to(root)) for f in files.values()
                     if '"rloo"' in f.read_text() or "'rloo'" in f.read_text())
    lines = sum(len(files[m].read_text().splitlines()) for m in lib)
    found = cycles(graph)
    print(f"modules under flywheel/: {sum(1 for m in lib if not files[m].name == '__init__.py')} "
          f"(+ {sum(1 for m in lib if files[m].name == '__init__.py')} packages), lines: {lines:,}")
    print(f"top-level entries in flywheel/: {len([p for p in (root / 'flywheel').iterdir() if p.suffix == '.py' or (p.is_dir() and (p / '__init__.py').exists())])}")
    print(f"import arrows between project modules: {sum(len(v) for v in graph.values())}; layers: {layers(graph)}")
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"library modules importing prefect: {len(prefect)}" + "".join(f"\n  {m}" for m in prefect))
    print(f"files naming a trainer (\"rloo\"): {len(trainer)}" + "".join(f"\n  {t}" for t in trainer))


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


if __name__ == "__main__":
    main()
