"""Helpers shared by the ``sia-*`` commands: logging set-up and one-line usage errors."""

from __future__ import annotations

import logging

import click


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str) -> None:
    """Exit with status 2 and one line naming the problem (click's usage-error convention)."""
    raise click.UsageError(str(message).splitlines()[0])


def parse_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
