"""Helpers shared by the ``sia-*`` commands: logging set-up and one-line errors."""

from __future__ import annotations

import logging
import sys

import click


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
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # e.g. the "accelerate not found" notice


def die(message: str, status: int = 2) -> None:
    """Exit with ``status`` (2: bad input) and one line ``PROG: error: MESSAGE`` on stderr."""
    ctx = click.get_current_context(silent=True)
    prog = ctx.find_root().info_name if ctx else "sia"
    lines = str(message).splitlines()
    click.echo(f"{prog}: error: {lines[0] if lines else 'failed'}", err=True)
    sys.exit(status)


def storage_failure(err: Exception) -> None:
    """Exit for a :class:`~sia_pipeline.dataset.storage.StorageError`: 1 with a rerun hint when
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
