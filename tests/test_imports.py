"""The package's rooms import one way: no module imports, directly or around a circle, a module that imports it
(imports inside functions count; those under `if TYPE_CHECKING:` do not run). docs/ARCHITECTURE.md draws the
layers."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "gcvit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` names a.b where that is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_import_what_they_use_by_name() -> None:
    """`import gcvit` then `gcvit.create_model` would hide an import from the graph: the package's own modules
    import the names they use from their homes."""
    bare = [
        name
        for name, path in _modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import) and any(alias.name == "gcvit" for alias in node.names)
    ]
    assert bare == []


def test_models_import_nothing_above_them() -> None:
    """The models (and the layers below them) never import the fetching, loading, data, training or CLI rooms."""
    above = ("gcvit.hub", "gcvit.loading", "gcvit.data", "gcvit.train", "gcvit.cli", "gcvit.export", "gcvit.bench_timm")
    graph = import_graph()
    wrong = {
        name: sorted(e for e in edges if e.startswith(above))
        for name, edges in graph.items()
        if name.startswith(("gcvit.models", "gcvit.layers"))
    }
    assert {k: v for k, v in wrong.items() if v} == {}


# docs/ARCHITECTURE.md's layers, bottom first: a room imports only rooms of lower layers
LAYERS = [
    ("gcvit", "gcvit.atomic", "gcvit.imagenet", "gcvit.extras", "gcvit.flops", "gcvit.allocator", "gcvit.figures"),
    ("gcvit.digests",),
    ("gcvit.download",),
    ("gcvit.layers",),
    ("gcvit.models",),
    ("gcvit.hub",),
    ("gcvit.loading",),
    ("gcvit.data",),
    ("gcvit.train", "gcvit.export", "gcvit.visualize"),
    ("gcvit.bench_timm",),
    ("gcvit.compare_families",),
    ("gcvit.cli",),
]


def test_rooms_import_only_lower_layers() -> None:
    rank = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}

    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph = import_graph()
    assert {room(m) for m in graph} <= set(rank), "a new room: give it a layer here and in docs/ARCHITECTURE.md"
    upward = sorted(f"{a} -> {b}" for a, edges in graph.items() for b in edges if rank[room(b)] > rank[room(a)])
    assert upward == []


def test_no_loose_cli_modules() -> None:
    assert sorted(p.name for p in (SRC / "gcvit").glob("cli_*.py")) == []
