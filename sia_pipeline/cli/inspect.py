"""``sia-inspect ROOT``: summary table, one sample (``--key``), or a re-sampling check
(``--regenerate``). Thin: the work is in :mod:`sia_pipeline.publish.inspection`.

Exit status: 0 done (and, with --regenerate, bit-identical), 1 not identical, 2 bad root,
key or model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sia_pipeline.cli._common import (
    SiaCommand,
    die,
    s3_endpoint_option,
    setup_logging,
    storage_failure,
)
from sia_pipeline.io.inputs import BATCH


@click.command(
    "sia-inspect",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
    epilog=(
        "Examples:\n\n"
        "  sia-inspect ./sia-data\n\n"
        "  sia-inspect s3://bucket/sia-v1 --key bottle-000003-000417 --out-dir /tmp\n\n"
        "  sia-inspect ./sia-data --regenerate bottle-000000-000001"
    ),
)
@click.argument("root")
@click.option("--key", metavar="KEY", help="Print this sample's metadata and write its image.")
@click.option(
    "--regenerate",
    metavar="KEY",
    help="Re-sample KEY from the recorded spec and model; say whether it is bit-identical.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Where --key writes KEY.png/jpg (and --regenerate KEY.regenerated.png).",
)
@click.option("--model", default=None, help="Model for --regenerate [default: the recorded one].")
@click.option(
    "--device",
    default="cpu",
    help="Torch device for --regenerate (cpu, cuda). Bit-identity holds on the kind of "
    "device the dataset was made on.",
)
@click.option(
    "--batch-size",
    type=BATCH,
    default=None,
    help="Batch for --regenerate [default: the recorded sia-gen --batch-size].",
)
@s3_endpoint_option()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(
    root: str,
    key: str | None,
    regenerate: str | None,
    out_dir: Path,
    model: str | None,
    device: str,
    batch_size: int | None,
    s3_endpoint_url: str | None,
    verbose: bool,
) -> None:
    """Look inside the SIA dataset at ROOT (a folder, file:// or s3:// URL).

    Without options, prints a table of shards, samples, strengths and bytes per category.

    Exit status: 0 done (--regenerate: bit-identical); 1 --regenerate found a difference;
    2 bad root, key or model.
    """
    setup_logging(verbose)
    from sia_pipeline.gen import regenerate as regen
    from sia_pipeline.io.storage import StorageError, open_storage
    from sia_pipeline.publish import inspection

    if key and regenerate:
        die("give --key or --regenerate, not both")
    from sia_pipeline.io.inputs import InputError, check_input, check_output

    try:
        check_input(root, "ROOT")
        check_input(model, "--model")
        if key or regenerate:  # KEY.png is written there, never into the dataset
            check_output(str(out_dir), "--out-dir", {"ROOT": root}, holds_inputs=True)
    except InputError as e:
        die(str(e))
    try:
        storage = open_storage(root, s3_endpoint_url)
        if regenerate:
            result = regen.regenerate(
                storage, regenerate, model, device, batch_size, s3_endpoint_url
            )
        elif key:
            sample = inspection.find_sample(storage, key, s3_endpoint_url)
        else:
            index, rows = inspection.summarize(storage)
    except StorageError as e:
        storage_failure(e)
    except inspection.InspectError as e:
        die(str(e))
    if regenerate:
        click.echo(result.describe())
        if result.image is not None and out_dir != Path("."):
            from sia_pipeline.format.writer import encode_image

            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{regenerate}.regenerated.png"
            path.write_bytes(encode_image(result.image, "png"))
            click.echo(f"regenerated image: {path}")
        if not (result.bit_identical and result.meta_identical):
            sys.exit(1)
    elif key:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{key}.{sample.ext}"
        path.write_bytes(sample.image)
        click.echo(json.dumps(sample.meta, indent=2, sort_keys=True))
        click.echo(f"image: {path}")
    else:
        click.echo(inspection.format_summary(storage.url, index, rows))


if __name__ == "__main__":
    main()
