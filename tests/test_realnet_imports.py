"""realnet_train reads SIA data only through the format contract (and its storage layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import realnet_train

ALLOWED = {"sia_pipeline.dataset.format", "sia_pipeline.dataset.storage"}


def sia_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] == "sia_pipeline"}


def test_realnet_train_imports_only_the_format_contract():
    files = sorted(Path(realnet_train.__file__).parent.rglob("*.py"))
    assert len(files) > 10
    used = {f.name: sia_imports(f) for f in files}
    bad = {name: mods - ALLOWED for name, mods in used.items() if mods - ALLOWED}
    assert not bad, f"realnet_train imports sia_pipeline internals: {bad}"
    assert "sia_pipeline.dataset.format" in set().union(*used.values())
