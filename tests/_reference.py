"""Load single functions from the RealNet authors' code for equality tests (never at run time).

Their ``datasets/realnet_dataset.py`` imports packages this project does not have (imgaug, an
absent ``image_reader``), so the needed functions are taken out of the file by name and run
in a namespace holding only what they use. Tests skip with a reason when the code is absent.
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "realnet-official"
DATASET_FILE = REFERENCE / "datasets" / "realnet_dataset.py"


def reference_functions(*names: str, **namespace: object) -> dict[str, object]:
    """Functions (or methods of ``RealNetDataset``) from the authors' dataset file, by name."""
    if not DATASET_FILE.is_file():
        pytest.skip(f"the authors' code is absent ({DATASET_FILE})")
    tree = ast.parse(DATASET_FILE.read_text())
    found: dict[str, ast.FunctionDef] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
    missing = set(names) - set(found)
    assert not missing, f"not in {DATASET_FILE}: {missing}"
    # np.bool / np.int were removed from NumPy; the authors' code predates that.
    np_shim = types.SimpleNamespace(
        **{k: getattr(np, k) for k in dir(np) if not k.startswith("__")}
    )
    np_shim.bool, np_shim.int = bool, int
    scope: dict[str, object] = {"np": np_shim, "math": math, **namespace}
    module = ast.Module(body=[found[n] for n in names], type_ignores=[])
    exec(compile(module, str(DATASET_FILE), "exec"), scope)  # noqa: S102
    return {n: scope[n] for n in names}
