"""``sia_pipeline`` is built in floors, and every import points down a floor.

From the bottom: ``io`` (storage, S3 retries, the lease, joining Ray), ``format`` (format
v1, the generation spec and its seeding, ``spec.json``, writer, manifest, card, verify),
then ``compose`` and ``diffusion``, then the stages: ``publish`` (publish and inspect, read
only) below ``gen`` and ``export``, and ``cli`` on top. A module may import its own
subpackage and any lower floor, never a floor beside or above it (function-level imports
count too), and the modules' import graph has no cycle. ``io``, ``format`` and ``compose``
load no torch, Ray or diffusers.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import sia_pipeline

PACKAGE = Path(sia_pipeline.__file__).parent
FLOORS = [("io",), ("format",), ("compose", "diffusion"), ("publish",), ("gen", "export"), ("cli",)]
FLOOR = {sub: n for n, subs in enumerate(FLOORS) for sub in subs}
LIGHT = ("io", "format", "compose")  # floors that must not load the heavy libraries
HEAVY = ("torch", "ray", "diffusers")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The ``sia_pipeline`` modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:  # ``from pkg import module`` names the module itself
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m.split(".")[0] == "sia_pipeline"}


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_subpackage_has_a_floor():
    subs = {subpackage(m) for m in MODULES} - {None}
    assert subs == set(FLOOR), f"give each subpackage a floor: {subs ^ set(FLOOR)}"


def test_no_relative_imports():
    """The floor check reads absolute imports; a relative one would slip past it."""
    relative = [
        name
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative


def test_every_import_points_down():
    against = []
    for name, path in MODULES.items():
        here = subpackage(name)
        for target in imported_modules(path):
            there = subpackage(target)
            assert target in MODULES, f"{name} imports {target}, which does not exist"
            if here is None or there is None or there == here:
                continue
            if FLOOR[there] >= FLOOR[here]:
                against.append(f"{name} -> {target}")
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_no_import_cycles():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_light_floors_load_no_torch_ray_or_diffusers():
    light = [m for m in MODULES if subpackage(m) in LIGHT]
    assert len(light) > 10
    code = (
        "import importlib, sys\n"
        f"for m in {light!r}: importlib.import_module(m)\n"
        f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"io/format/compose load {out.stdout.strip()}"
