"""Every console script's ``--help`` answers without loading torch, Ray or diffusers.

Those take seconds to import (torch alone about 3 s idle, 10 s on a loaded machine); a
command imports them only when its work starts, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SCRIPTS = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
HEAVY = ("torch", "ray", "diffusers", "timm", "torchvision")

PROBE = """
import contextlib, importlib, io, json, sys
name, target = sys.argv[1], sys.argv[2]
module, attr = target.split(":")
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        getattr(importlib.import_module(module), attr).main(["--help"], prog_name=name)
        code = 0
    except SystemExit as e:
        code = e.code
heavy = [m for m in HEAVY if m in sys.modules]
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": heavy}))
"""


def test_every_command_is_probed():
    assert len(SCRIPTS) == 10


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_loads_no_heavy_library(name):
    probe = f"HEAVY = {HEAVY!r}\n{PROBE}"
    res = subprocess.run(
        [sys.executable, "-c", probe, name, SCRIPTS[name]],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    assert got["help"].startswith("Usage: " + name)
    assert got["heavy"] == [], f"{name} --help imports {got['heavy']}"
