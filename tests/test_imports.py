"""The package's modules import one another without cycles (every import
counted, those inside functions too): a part of the layer (a statistics
source, a correction) never imports the layer, and a program's pieces never
import the front end that runs them."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nbbn"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path, modules):
    """The package's modules that ``path`` imports: ``from .a import b`` counts
    ``a.b`` where that is a module, else ``a``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            found.update(submodules or {base})
    return {m for m in found if m in modules and m != name}


def import_graph():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(path, paths) for name, path in paths.items()}


def cycles(graph):
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "nbbn.parts" in graph["nbbn.batchnorm"]  # from .parts import ... (top level)
    assert "nbbn.gpu.backend" in graph["nbbn.batchnorm"]  # inside a function
    assert "nbbn.functional" in graph["nbbn.programs.bench_engines"]  # from .. import functional
    assert "nbbn._validation" in graph["nbbn.batchnorm"]  # from . import _validation


def test_no_import_cycles():
    groups = cycles(import_graph())
    assert not groups, f"modules importing one another: {groups}"


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_parts_do_not_import_the_layer():
    graph = import_graph()
    for layer in ("nbbn.batchnorm", "nbbn.renorm", "nbbn.sync"):
        assert layer not in graph["nbbn.parts"]
