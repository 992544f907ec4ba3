"""realnet_train reads SIA data only through the format contract (and its storage layer).

It also composes anomalies with ``sia_pipeline.compose`` (numpy/OpenCV only, no Ray or
sampling), the one module ``sia-export`` uses too, so both make the same anomalies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import realnet_train

ALLOWED = {
    "sia_pipeline.format.v1",
    "sia_pipeline.io.storage",
    "sia_pipeline.io.inputs",  # the input checks every command shares
    "sia_pipeline.format.schema",  # the validator of untrusted metadata
}
ALLOWED_PACKAGES = ("sia_pipeline.compose",)  # the package and its modules


def allowed(module: str) -> bool:
    return module in ALLOWED or any(
        module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES
    )


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
    bad = {n: {m for m in mods if not allowed(m)} for n, mods in used.items()}
    bad = {n: mods for n, mods in bad.items() if mods}
    assert not bad, f"realnet_train imports sia_pipeline internals: {bad}"
    assert "sia_pipeline.format.v1" in set().union(*used.values())
