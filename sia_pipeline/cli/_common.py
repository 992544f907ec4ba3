"""Helpers shared by the ``sia-*`` commands: logging set-up, one-line errors, a clean exit."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any, NoReturn

import click

# --strength-min-t of sia-gen and sia-preview (sia-gen adds that it is part of the spec).
STRENGTH_MIN_T_HELP = (
    "Apply the SDAS strength term only on steps whose timestep t >= this (of the "
    "model's T); later, low-noise steps are plain DDPM/DDIM. 0 = every step, as the paper. "
    "The default departs from the paper (RealNet applies s on every step): on the late steps "
    "s turns into grain, not structure (bench/results/sia_strength_structure.md), and RealNet "
    "learned more from SIA made with 500 (bench/results/realnet_quality.md)."
)


def exit_process(code: int | str | None = 0) -> NoReturn:
    """End a command's process with ``code`` without tearing the interpreter down.

    Native thread pools outlive the work they did: Arrow's CPU and IO pools, jemalloc's and
    OpenBLAS's threads, torch's. During ``Py_FinalizeEx`` a pool thread that drops the last
    reference to a Python object (Arrow's ``PyBuffer`` around bytes read from a Python file)
    must take the GIL; a finalizing Python ends such a thread with ``pthread_exit``, whose
    forced unwind through a ``noexcept`` C++ destructor calls ``std::terminate``: "terminate
    called without an active exception", SIGABRT, exit 134, after all output was printed.
    The longer the pool lags (a loaded machine), the likelier. So once the command is done:
    join Python's own threads and run the ``atexit`` handlers (Ray shutdown, executor joins,
    logging flush, temp folders) while everything is alive, flush stdio, then ``os._exit``,
    which never runs the interpreter's or C++'s teardown.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    try:
        shutdown_threads = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls
        if shutdown_threads is not None:
            shutdown_threads()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing more to say
                pass
        os._exit(code)


class SiaCommand(click.Command):
    """A click command that, run as a program, ends through :func:`exit_process`.

    Only the program entry (``main()``: console scripts, ``python -m``) exits that way;
    ``CliRunner`` calls ``main.main(...)`` and keeps its normal ``SystemExit``.
    """

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        """Click's main, with its usage errors as one line ``PROG: error: ...`` (exit 2)."""
        extra.pop("standalone_mode", None)
        prog_name = self.name  # not the script's file name under ``python -m``
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            lines = [ln for ln in e.format_message().splitlines() if ln.strip()]
            click.echo(f"{prog_name}: error: {lines[0] if lines else 'failed'}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def __call__(self, *args, **kwargs) -> NoReturn:
        try:
            self.main(*args, **kwargs)
        except SystemExit as e:
            exit_process(e.code)
        exit_process(0)


def setup_logging(verbose: bool) -> None:
    """Our own INFO lines (DEBUG with -v); libraries only at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("sia_pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # diffusers' notices (e.g. "accelerate not found") only at ERROR, without importing it
    # (and torch) into commands that never use it; Ray workers inherit the variable.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()


def die(message: str, status: int = 2) -> None:
    """Exit with ``status`` (2: bad input) and one line ``PROG: error: MESSAGE`` on stderr."""
    ctx = click.get_current_context(silent=True)
    prog = ctx.find_root().info_name if ctx else "sia"
    lines = str(message).splitlines()
    click.echo(f"{prog}: error: {lines[0] if lines else 'failed'}", err=True)
    sys.exit(status)


def storage_failure(err: Exception) -> None:
    """Exit for a :class:`~sia_pipeline.io.storage.StorageError`: 1 with a rerun hint when
    the failure is transient (throttling, 5xx, resets: it was retried already), else 2."""
    if getattr(err, "transient", False):
        die(f"{err}; rerun the same command once the storage recovers", 1)
    die(str(err))


def s3_endpoint_option(dest: str = "s3_endpoint_url"):
    """``--s3-endpoint-url`` (or ``AWS_ENDPOINT_URL``), the same on every command."""
    return click.option(
        "--s3-endpoint-url",
        dest,
        default=None,
        envvar="AWS_ENDPOINT_URL",
        show_envvar=True,
        help="S3 endpoint for MinIO, Ceph, R2 (credentials come from the AWS chain).",
    )


def parse_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
