"""``sia-publish ROOT``: verify every shard in full, then write the published dataset card.

Thin: parses options and calls :func:`sia_pipeline.publish.publish.publish`. Exit status: 0
published, 1 bad shards (each named on stderr, nothing written), 2 unusable root.
"""

from __future__ import annotations

import sys

import click

from sia_pipeline.cli._common import (
    SiaCommand,
    die,
    s3_endpoint_option,
    setup_logging,
    storage_failure,
)


@click.command(
    "sia-publish",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
    epilog="Examples:\n\n  sia-publish ./sia-data\n\n  sia-publish s3://bucket/sia-v1",
)
@click.argument("root")
@s3_endpoint_option()
@click.option(
    "--threads", type=click.IntRange(1, 64), default=8, help="Shards verified in parallel."
)
@click.option(
    "--previews-per-bin",
    type=click.IntRange(1, 32),
    default=6,
    help="Samples per strength bin in each category's preview grid.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(
    root: str, s3_endpoint_url: str | None, threads: int, previews_per_bin: int, verbose: bool
) -> None:
    """Verify and publish the SIA dataset at ROOT (a folder, file:// or s3:// URL).

    Reads every shard in full and checks it against its stats (sha256, size, sample
    count, keys); any bad shard is named and nothing is written. Otherwise rebuilds
    manifest.parquet and index.json from the stats if missing or stale, and writes
    README.md (Hugging Face dataset card: WebDataset configs, counts per category and
    strength, provenance), strength_histogram.png, preview grids and SHA256SUMS.

    Holds the root's lease while it runs: refused while a sia-gen writes ROOT, and no
    sia-gen starts on ROOT until it ends.

    Exit status: 0 published; 1 bad shards (each named); 2 not a dataset, unreachable, or
    being written by sia-gen.
    """
    setup_logging(verbose)
    from sia_pipeline.io.inputs import InputError, check_input
    from sia_pipeline.io.lease import LeaseLost
    from sia_pipeline.io.storage import StorageError
    from sia_pipeline.publish.publish import PublishError, publish

    try:
        check_input(root, "ROOT")
    except InputError as e:
        die(str(e))
    try:
        report = publish(root, s3_endpoint_url, threads, previews_per_bin)
    except StorageError as e:
        storage_failure(e)
    except PublishError as e:
        die(str(e))
    except LeaseLost as e:
        die(f"{e}; nothing was written: rerun sia-publish", status=1)
    for check in report.bad:
        click.echo(f"BAD {check.describe()}", err=True)
    click.echo(report.summary(), err=bool(report.bad))
    if report.bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
