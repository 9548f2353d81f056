"""The package's import graph: no cycles (imports inside functions count: a function-level import only hides a loop
until the function runs) and no module importing another module's private names.

The graph is read with ``ast`` from every module's source, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "formerkit"


def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source, is a package __init__)} of every module under ``package_dir``."""
    sources = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(), is_package)
    return sources


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(sources: dict[str, tuple[str, bool]]) -> tuple[dict[str, set[str]], list[str]]:
    """(edges {module: the package's modules it imports}, the private-name imports found, one line each).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; ``import a.b.c`` is
    an edge to ``a.b.c`` alone (the parent packages Python imports on the way are not the importer's doing).
    """
    modules = set(sources)
    roots = {name.split(".")[0] for name in modules}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private: list[str] = []

    def module_of(dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is one of the modules (None outside the package)."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    def check_private(importer: str, owner: str, names: list[str], line: int) -> None:
        # A private name is its module's own business: whoever else needs it needs a public name.
        for name in names:
            if _is_private(name) and importer != owner:
                private.append(f"{importer}:{line} imports {owner}.{name}")

    for importer, (source, is_package) in sources.items():
        package = importer if is_package else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(source, filename=importer)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in roots:
                        continue
                    target = module_of(alias.name)
                    if target is None:
                        continue
                    edges[importer].add(target)
                    parts = alias.name.split(".")
                    for index, part in enumerate(parts[1:], start=1):
                        check_private(importer, ".".join(parts[:index]), [part], node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if origin.split(".")[0] not in roots:
                    continue
                parts = origin.split(".")
                for index, part in enumerate(parts[1:], start=1):
                    check_private(importer, ".".join(parts[:index]), [part], node.lineno)
                check_private(importer, origin, [alias.name for alias in node.names], node.lineno)
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    target = submodule if submodule in modules else module_of(origin)
                    if target is not None:
                        edges[importer].add(target)
    for importer in edges:
        edges[importer].discard(importer)
    return edges, private


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted, iteratively (no recursion
    limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest import chain from the component's first module back to itself, e.g. [a, b, c, a]."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(previous[chain[-1]])
                    return [*reversed(chain), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component}: not a cycle")


def cycles(edges: dict[str, set[str]]) -> list[str]:
    """One readable chain per strongly connected component, with the component's other members."""
    report = []
    for component in strongly_connected(edges):
        chain = cycle_in(component, edges)
        others = sorted(set(component) - set(chain))
        report.append(" -> ".join(chain) + (f"  (the loop also takes in {', '.join(others)})" if others else ""))
    return report


def test_the_package_has_no_import_cycles():
    sources = package_sources()
    assert len(sources) > 50, f"found only {len(sources)} modules under {PACKAGE_DIR}"
    edges, _ = import_graph(sources)
    assert sum(len(targets) for targets in edges.values()) > 100  # the parse found the package's imports
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph(package_sources())
    assert not private, "private names imported from other modules:\n" + "\n".join(private)


def test_the_checker_finds_a_cycle_and_a_private_import_and_passes_an_acyclic_package():
    looped = {
        "pkg": ("", True),
        "pkg.a": ("from pkg.b import thing\n", False),
        "pkg.b": ("def later():\n    from . import c\n", False),
        "pkg.c": ("import pkg.a\n", False),
    }
    edges, private = import_graph(looped)
    assert cycles(edges) == ["pkg.a -> pkg.b -> pkg.c -> pkg.a"]
    assert private == []

    leaky = {
        "pkg": ("from pkg.sub import mod\n", True),
        "pkg.sub": ("", True),
        "pkg.sub.mod": ("_secret = 1\n", False),
        "pkg.user": ("def f():\n    from .sub.mod import _secret, __doc__\n", False),
    }
    edges, private = import_graph(leaky)
    assert private == ["pkg.user:2 imports pkg.sub.mod._secret"]
    assert edges["pkg"] == {"pkg.sub.mod"} and edges["pkg.user"] == {"pkg.sub.mod"}
    assert cycles(edges) == []
    hidden = {"pkg": ("", True), "pkg._hidden": ("", False), "pkg.user": ("import pkg._hidden\n", False)}
    assert import_graph(hidden)[1] == ["pkg.user:1 imports pkg._hidden"]

    # The package importing a module that imports the package's name is a cycle; a parent package alone is not.
    assert cycles(import_graph({"pkg": ("from pkg.m import x\n", True), "pkg.m": ("import pkg\n", False)})[0])
    assert not cycles(import_graph({"pkg": ("from pkg.m import x\n", True), "pkg.m": ("import pkg.n\n", False),
                                    "pkg.n": ("", False)})[0])
