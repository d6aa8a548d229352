"""docs/architecture.md names real code: every `file:function` hop it lists exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOP = re.compile(r"`([\w/]+\.py):([\w.]+)`")


def _defined_names(path: Path) -> set[str]:
    """Every module-level function and class, and every method as ``Class.method``."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}.{item.name}")
    return names


def test_every_hop_in_the_architecture_map_exists() -> None:
    """A renamed or moved function makes this fail until the map is updated with it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    hops = HOP.findall(text)
    assert len(hops) >= 10, "the data path should be listed hop by hop"
    missing = [
        f"{file}:{name}"
        for file, name in hops
        if not (ROOT / file).is_file() or name not in _defined_names(ROOT / file)
    ]
    assert not missing, f"docs/architecture.md names code that does not exist: {missing}"
