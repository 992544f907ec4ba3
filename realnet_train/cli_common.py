"""What the ``realnet-*`` commands share: one-line errors, number types that refuse nan, logging.

Contract: bad input exits 2 with the single line ``PROG: error: MESSAGE`` (click's own usage
errors included) before anything is created; a runtime failure exits 1 with one line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

import click

from sia_pipeline.io.inputs import (  # noqa: F401 - the one input layer, re-exported
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY_OPEN,
    InputError,
    Number,
)

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def one_line(message: object) -> str:
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    return lines[0] if lines else "failed"


def die(message: object, status: int = 2) -> NoReturn:
    """Exit with ``status`` and the one line ``PROG: error: MESSAGE`` on stderr."""
    ctx = click.get_current_context(silent=True)
    prog = ctx.find_root().info_name if ctx else "realnet"
    click.echo(f"{prog}: error: {one_line(message)}", err=True)
    sys.exit(status)


class OneLineCommand(click.Command):
    """A click command whose usage errors are one line ``PROG: error: ...`` (exit 2)."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        prog_name = self.name  # not "python -m realnet_train.cli" or torchrun's script name
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            name = (e.ctx.find_root().info_name if e.ctx else None) or prog_name or self.name
            click.echo(f"{name}: error: {one_line(e.format_message())}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"{prog_name or self.name}: error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def s3_endpoint_option():
    """``--s3-endpoint-url`` (or ``AWS_ENDPOINT_URL``), the same on every realnet command."""
    return click.option(
        "--s3-endpoint-url",
        default=None,
        envvar="AWS_ENDPOINT_URL",
        help="S3 endpoint (MinIO, R2).",
    )


def setup_logging(verbose: bool) -> None:
    """Our INFO lines (DEBUG with -v); libraries at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "urllib3", "filelock", "PIL", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
