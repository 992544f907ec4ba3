"""Loopback servers for tests and benchmarks: a free TCP port, and a moto S3 server on one.

Used by ``conftest.py`` (the session's S3 endpoint), the torchrun and Ray-job tests (a free
port) and the sia-gen benchmarks (their own S3 server).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port: (process, endpoint URL).

    Raises:
        RuntimeError: it exited, or did not accept connections within ``timeout_s``.
    """
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                msg = f"moto_server exited with {proc.returncode}"
                raise RuntimeError(msg) from None
            time.sleep(0.2)
    proc.kill()
    msg = f"moto_server did not start within {timeout_s:g} s"
    raise RuntimeError(msg)
