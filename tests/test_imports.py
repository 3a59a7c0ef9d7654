"""The ``hat`` package imports one way: no module imports one that imports it back.

Every import statement counts, at module level, under ``TYPE_CHECKING`` or inside a function, so
a circle cannot hide in a lazy import. An import of ``a.b.c`` runs the packages ``a`` and
``a.b`` first; those edges are left out, as a package that re-exports its modules is no circle.
"""

import ast
from pathlib import Path

import hat

PACKAGE = Path(hat.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.Import | ast.ImportFrom, name: str, is_package: bool) -> list[str]:
    """The dotted names ``node`` may load: modules, or a module's attributes."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package that it imports, anywhere in its code."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in imported_names(node, name, path.name == "__init__.py"):
                while target and target not in paths:  # an attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A circle of imports ``[a, b, ..., a]``, or ``[]`` where there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / next(iter(files)).split("/")[0]


def test_a_circle_hidden_in_a_function_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.team import Team\n",
            "pkg/team.py": "from pkg.builder import stage\n\nclass Team: ...\n",
            "pkg/builder.py": "def stage():\n    from .team import Team  # imports this module\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/leaf.py": "import pkg.builder\nfrom pkg import team\n",
        },
    )
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.team"},
        "pkg.team": {"pkg.builder"},
        "pkg.builder": {"pkg.team"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg", "pkg.builder", "pkg.team"},
    }
    assert find_cycle(graph) == ["pkg.team", "pkg.builder", "pkg.team"]
    (package / "builder.py").write_text("def stage(): ...\n")
    assert find_cycle(import_graph(package)) == []


def test_hat_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert {"hat.gallery.builder", "hat.gallery.shards", "hat.gallery.staging"} <= graph.keys()
    assert "hat.gallery.shards" in graph["hat.gallery.builder"]
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
