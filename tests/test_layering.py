"""The package's import graph, read from the source with ``ast``: no module imports a module that imports it
back (imports inside functions count: they run too), and nothing below the shell imports the shell (see
DESIGN.md, "Layering"). Imports under ``if TYPE_CHECKING:`` are left out: they never run."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "serimats_func"
SHELL = {"serimats_func", "serimats_func.__main__", "serimats_func.experiments", "serimats_func.cli",
         "serimats_func.cluster", "serimats_func.plotter", "serimats_func.loggers", "serimats_func.export",
         "serimats_func.interpolation"}


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (anywhere in it)."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        edges: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names if a.name.split(".")[0] == "serimats_func")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "serimats_func":
                    continue
                for alias in node.names:  # `from . import pytrees` imports the module pytrees
                    edges.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in mods else known(module))
        edges.discard(None)
        edges.discard(name)
        graph[name] = edges  # type: ignore[assignment]
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


def test_the_graph_reader_sees_imports_at_module_level_and_inside_functions():
    graph = import_graph()
    assert "serimats_func.run.runner" in graph["serimats_func.experiments"]  # at module level
    assert "serimats_func.cluster" in graph["serimats_func.experiments"]  # inside run()
    assert "serimats_func.core.pytrees" in graph["serimats_func.experiments"]  # from . import pytrees
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_a_module_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_nothing_below_the_shell_imports_the_shell():
    graph = import_graph()
    wrong = {m: sorted(graph[m] & SHELL) for m in graph if m not in SHELL and graph[m] & SHELL}
    assert wrong == {}


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_is_pure_torch_and_imports_neither_the_run_nor_the_store():
    graph, mods = import_graph(), modules()
    core = [m for m in graph if m.startswith("serimats_func.core")]
    assert core
    above = ("serimats_func.run", "serimats_func.store")
    wrong = {m: sorted(d for d in graph[m] if d.startswith(above) or d in SHELL) for m in core}
    assert {m: d for m, d in wrong.items() if d} == {}
    io = {"xarray", "zarr", "matplotlib", "tqdm", "submitit", "os", "pathlib", "shutil"}
    assert {m: sorted(_third_party(mods[m][0]) & io) for m in core if _third_party(mods[m][0]) & io} == {}
