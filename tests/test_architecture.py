"""The package's shape, checked rather than promised: the Ray-free layers never import Ray, the package's
imports form no cycle between files, and no file of the package is longer than LINE_LIMIT lines.

Self-contained (it reads the package's own files), so that a fresh clone and CI check the same thing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorahub_ray"
LINE_LIMIT = 450
# the layers that never import Ray, not even inside a function; cluster/ (and the cli/ above it) hold Ray
RAY_FREE_PACKAGES = ("core", "io", "evaluation", "serving", "demo")
RAY_FREE_FILES = ("errors.py", "progress.py")
# what a Ray-free file may not reach either: the Ray layer, and the layers above it that import it
ABOVE_RAY_FREE = ("lorahub_ray.cluster", "lorahub_ray.cli", "lorahub_ray.api")


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def ray_free_files() -> list[Path]:
    files = [p for p in package_files() if p.relative_to(PACKAGE).parts[0] in RAY_FREE_PACKAGES]
    files += [PACKAGE / name for name in RAY_FREE_FILES]
    assert all(p.is_file() for p in files) and len(files) > len(RAY_FREE_PACKAGES)
    return files


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` for every import in ``path``, at module level and inside functions alike.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (``c`` may be a module); relative imports are
    resolved against the file's package.
    """
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def reaches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- the Ray-free layers ------------------------------------------------------------------------


def test_ray_free_layers_import_without_ray_in_a_fresh_interpreter():
    modules = [module_name(p) for p in ray_free_files()]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'ray': sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')),\n"
        "                  'files': [sys.modules[n].__file__ for n in " + repr(modules) + "]}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [Path(f).resolve() for f in seen["files"]] == ray_free_files()  # this checkout's files were imported
    assert seen["ray"] == [], f"importing the Ray-free layers imported {seen['ray'][:5]}"


def test_ray_free_files_never_import_ray_or_the_layers_above_anywhere():
    culprits = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in ray_free_files() for line, name in imported_names(p)
                if any(reaches(name, top) for top in ("ray", *ABOVE_RAY_FREE))]
    assert culprits == [], "Ray-free files import Ray or a layer above them:\n" + "\n".join(culprits)


def test_only_the_ray_layer_and_the_cli_import_ray():
    """api.py reaches Ray Data through cluster/ (inside the function that dispatches to it), never directly."""
    ray_layers = {"cluster", "cli"}
    culprits = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in package_files()
                if p.relative_to(PACKAGE).parts[0] not in ray_layers
                for line, name in imported_names(p) if reaches(name, "ray")]
    assert culprits == [], "Ray imported outside cluster/ and cli/:\n" + "\n".join(culprits)
    assert any(reaches(name, "ray") for p in (PACKAGE / "cluster").glob("*.py") for _, name in imported_names(p))


def test_the_import_walk_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The AST walk that the two tests above and the cycle test rely on finds an import hidden in a function,
    and resolves relative imports to the modules they name."""
    pkg = tmp_path / "lorahub_ray" / "core"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from . import y\nfrom ..io.storage import open_uri\n\n"
                              "def f():\n    import ray.data\n    return ray.data\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = imported_names(pkg / "x.py")
    assert (1, "lorahub_ray.core.y") in names and (2, "lorahub_ray.io.storage") in names
    assert (5, "ray.data") in names and reaches("ray.data", "ray") and not reaches("rayon", "ray")


# --- no import cycle between files --------------------------------------------------------------


def import_graph() -> dict[Path, dict[Path, int]]:
    """File -> {imported file: line}, for imports between the package's files. A package ``__init__`` only
    re-exports names, so edges into or out of one are left out (importing ``a.b.c`` runs ``a/__init__``
    first, which would otherwise tie every file to every other)."""
    files = package_files()
    by_module = {module_name(p): p for p in files}
    graph = {p: {} for p in files}
    for path in files:
        if path.name == "__init__.py":
            continue
        for line, name in imported_names(path):
            target = by_module.get(name)
            if target is not None and target != path and target.name != "__init__.py":
                graph[path].setdefault(target, line)
    return graph


def find_cycles(graph: dict) -> list[list]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of two or more nodes."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strong(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for group in groups:  # the shortest way back to the group's first node, by breadth-first search
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            ends = [w for w in sorted(graph[path[-1]]) if w in group]
            if start in ends:
                cycles.append(path + [start])
                break
            for w in ends:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def describe(cycle, graph) -> str:
    return " -> ".join(f"{a.relative_to(ROOT)}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])) + \
        f" -> {cycle[-1].relative_to(ROOT)}"


def test_no_import_cycle_between_the_package_files():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > len(graph)  # the walk did find the package's imports
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles (file:line of each import):\n" + "\n".join(describe(c, graph) for c in cycles)


def test_the_cycle_finder_reports_a_cycle_with_its_path():
    a, b, c, d = (ROOT / f"{n}.py" for n in "abcd")
    graph = {a: {b: 3}, b: {c: 5}, c: {a: 7}, d: {a: 1}}
    (cycle,) = find_cycles(graph)
    assert cycle == [a, b, c, a]
    assert describe(cycle, graph) == "a.py:3 -> b.py:5 -> c.py:7 -> a.py"
    assert find_cycles({a: {b: 1}, b: {}, c: {a: 2}}) == []


# --- file length ---------------------------------------------------------------------------------


def test_no_package_file_is_longer_than_the_limit():
    lengths = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in package_files()}
    too_long = [f"{path} has {n} lines" for path, n in lengths.items() if n > LINE_LIMIT]
    assert len(lengths) > 20 and too_long == [], f"over {LINE_LIMIT} lines, split them: " + "; ".join(too_long)
