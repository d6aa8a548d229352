"""Structure rules of the code base: cores that import alone, without the servers, and rules
read from the source with `ast` (nothing is imported for those).

Cycles, package directions and sizes are checked on every module of the first-party packages,
counting imports under `TYPE_CHECKING` and imports inside functions: a cycle hidden behind
either still couples the two modules for a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agents", "broker", "common", "certs", "ops")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100
# A function may be longer than MAX_FUNCTION_LINES only when its docstring contains this
# sentence, followed by the reason it must stay one piece.
ONE_PIECE_MARKER = "Kept as one piece:"

# Which first-party packages each package may import (itself is always allowed).
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "certs": frozenset({"common"}),
    "agents": frozenset({"common", "certs"}),
    "broker": frozenset({"common", "certs"}),
    # The operator's tools talk to the daemons over their APIs, so they import no daemon code.
    "ops": frozenset({"common", "certs"}),
}


@pytest.mark.parametrize("module", ["common.nbd.protocol", "common.hrl", "common.tls.identities"])
def test_core_imports_without_aiohttp_or_cryptography(module: str) -> None:
    """The NBD core, the HRL codec and the TLS identities load neither aiohttp nor (but for the
    identities, which parse certificates) cryptography, in a fresh interpreter."""
    heavy = ["aiohttp"] if module == "common.tls.identities" else ["aiohttp", "cryptography"]
    code = (
        f"import sys, {module}\n"
        f"loaded = [name for name in {heavy!r} if name in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"


@dataclass(frozen=True)
class Module:
    """One first-party module: dotted name, source path and parsed tree."""

    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        """Top-level package the module belongs to."""
        return self.name.split(".", 1)[0]

    @property
    def is_package_init(self) -> bool:
        """True for an `__init__.py`, whose relative imports resolve against itself."""
        return self.path.name == "__init__.py"


def _modules() -> list[Module]:
    found = []
    for package in PACKAGES:
        base = ROOT / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            tree = ast.parse(path.read_text(), filename=str(path))
            found.append(Module(".".join(parts), path, tree))
    return found


def _imported_names(module: Module) -> Iterator[tuple[str, int]]:
    """Every dotted name `module` imports, with its line; relative imports resolved."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.name.split(".")
                if not module.is_package_init:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            yield base, node.lineno
            # `from pkg import mod` imports the submodule `pkg.mod` when it exists.
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def _import_graph(modules: list[Module]) -> dict[str, set[str]]:
    names = {m.name for m in modules}
    graph: dict[str, set[str]] = {m.name: set() for m in modules}
    for module in modules:
        for target, _line in _imported_names(module):
            # Resolve to the longest first-party module the dotted name starts with.
            parts = target.split(".")
            while parts and ".".join(parts) not in names:
                parts.pop()
            if parts:
                resolved = ".".join(parts)
                # A package importing its own submodules is how packages are built, and a
                # submodule importing its package `__init__` is the other half of that edge;
                # only count edges that leave the importer's own ancestry.
                if resolved != module.name and not module.name.startswith(resolved + "."):
                    graph[module.name].add(resolved)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return components


def test_cycle_finder_sees_a_cycle() -> None:
    """The cycle finder reports a three-module loop and nothing for a chain."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles() -> None:
    """No two first-party modules import each other, directly or through others, at any level."""
    cycles = _cycles(_import_graph(_modules()))
    assert cycles == [], f"import cycles: {cycles}"


def test_package_directions() -> None:
    """agents and broker never import each other, common imports neither, certs no daemon."""
    wrong = []
    for module in _modules():
        allowed = ALLOWED_IMPORTS[module.package] | {module.package}
        for target, line in _imported_names(module):
            top = target.split(".", 1)[0]
            if top in ALLOWED_IMPORTS and top not in allowed:
                wrong.append(f"{module.path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == [], "imports against the package rules:\n" + "\n".join(sorted(set(wrong)))


def test_module_sizes() -> None:
    """No first-party module is longer than 700 lines."""
    long = [
        f"{m.path.relative_to(ROOT)}: {n} lines"
        for m in _modules()
        if (n := len(m.path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long == [], "modules over the limit:\n" + "\n".join(long)


def test_function_sizes() -> None:
    """No function is longer than 100 lines unless its docstring says why it is one piece."""
    long = []
    for module in _modules():
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - start + 1
            doc = ast.get_docstring(node) or ""
            if length > MAX_FUNCTION_LINES and ONE_PIECE_MARKER not in doc:
                long.append(f"{module.path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    assert long == [], "functions over the limit without a reason:\n" + "\n".join(long)
