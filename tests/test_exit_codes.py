"""Commands exit with their own status, never with an abort at interpreter exit.

``sia-inspect`` used to print its summary and then die with "terminate called without an
active exception" (SIGABRT, 134) now and then on a loaded machine: an Arrow pool thread
released a Python buffer during interpreter teardown (see ``cli._common.exit_process``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = 16


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sia_inspect_exits_0_every_time_under_load(dataset):
    """16 runs, four at a time, beside a busy process: every exit status is 0."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cmd = [sys.executable, "-m", "sia_pipeline.cli.inspect", str(dataset)]

    def run(_):
        return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(RUNS)))
    finally:
        busy.kill()
        busy.wait()
    assert [r.returncode for r in results] == [0] * RUNS, [r.stderr[-500:] for r in results]
    assert all("all" in r.stdout and "bottle" in r.stdout for r in results)
    assert not any("terminate called" in r.stderr for r in results)


SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    import click
    from sia_pipeline.cli._common import SiaCommand, die

    @click.command("demo", cls=SiaCommand)
    @click.option("--fail", is_flag=True)
    def main(fail):
        atexit.register(lambda: print("atexit ran", flush=True))
        worker = threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined")))
        worker.start()  # not a daemon: the exit path must wait for it
        print("partial line without newline", end="")  # flushed though stdout is a pipe
        if fail:
            die("bad input")

    main()
    """
)


def test_exit_path_keeps_status_output_threads_and_atexit(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(SCRIPT)
    ok = subprocess.run([sys.executable, str(script)], env=env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["partial line without newlinethread joined", "atexit ran"]
    bad = subprocess.run(
        [sys.executable, str(script), "--fail"], env=env(), capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "demo: error: bad input"  # the command, not the file
    assert "atexit ran" in bad.stdout and "thread joined" in bad.stdout
