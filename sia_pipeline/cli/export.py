"""``sia-export``: anomaly image + mask pairs in MVTec AD, anomalib Folder or WebDataset layout.

Thin: parses options and calls :func:`sia_pipeline.export.export.export`. Bad input exits 2
with one line before anything is written; units that keep failing exit 1 (rerun to finish).
"""

from __future__ import annotations

import os

import click

from sia_pipeline.cli._common import SiaCommand, die, s3_endpoint_option, setup_logging
from sia_pipeline.compose.foreground import CHOICES
from sia_pipeline.export.export import HOLDOUT
from sia_pipeline.export.export_layouts import LAYOUTS
from sia_pipeline.io.inputs import (
    MAX_COUNT,
    MAX_SIDE,
    MAX_WORKERS,
    SEED,
    InputError,
    Number,
    check_disk,
    check_input,
    check_memory,
    check_output,
    local_path,
    parse_strength_range,
)

# Working set of one output in float32 (normal, source, blend, masks, Perlin noise).
BYTES_PER_PIXEL = 64
MAX_PER_IMAGE = 1000  # outputs per normal image (the authors' SIA set: about 30 per image)
# Written per output: the PNG image (about 3/4 of raw RGB), the 1-bit-ish PNG mask, a row.
OUTPUT_BYTES_PER_PIXEL = 3


def _check_inputs(kw: dict) -> tuple[float, float] | None:
    """Every option against the machine and the other options; creates nothing.

    Raises:
        InputError: one line naming the option, the value and the limit.
    """
    check_input(kw["sia_root"], "SIA_ROOT")
    check_input(kw["data"], "--data")
    check_input(kw["textures"], "--textures")
    sources = {"SIA_ROOT": kw["sia_root"], "--data": kw["data"], "--textures": kw["textures"]}
    check_output(kw["out"], "--out", sources)
    workers = kw["workers"] if kw["workers"] is not None else os.cpu_count() or 1
    size = kw["image_size"]
    check_memory(
        size * size * BYTES_PER_PIXEL * max(1, workers),
        f"--image-size {size} with {max(1, workers)} worker(s)",
    )
    normals = _count_normals(kw["data"], kw["category"], kw["s3_endpoint_url"])
    outputs = normals * kw["per_image"]
    if outputs > MAX_COUNT:
        msg = (
            f"--per-image {kw['per_image']} x {normals} normal images makes {outputs} outputs"
            f" (at most {MAX_COUNT})"
        )
        raise InputError(msg)
    need = outputs * (size * size * OUTPUT_BYTES_PER_PIXEL + 4096)
    check_disk(kw["out"], need, f"{outputs} outputs of {size} px")
    return parse_strength_range(kw["strengths"])


def _count_normals(data: str, category: str, endpoint_url: str | None) -> int:
    """Normal images of ``category`` under a local ``data`` root (0 when remote or absent:
    the export itself then says what is missing)."""
    from sia_pipeline.io.storage import IMAGE_SUFFIXES, iter_files, join_url, open_storage

    if local_path(data) is None or not category or "/" in category:
        return 0
    try:
        storage = open_storage(join_url(data, category), endpoint_url)
        return sum(1 for _ in iter_files(storage, "train/good", IMAGE_SUFFIXES))
    except (OSError, ValueError):
        return 0


@click.command(
    "sia-export",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
    epilog=(
        "\b\nExamples:\n"
        "  sia-export sia-data --data mvtec_ad --category bottle --out pairs --per-image 2\n"
        "  sia-export s3://b/sia --data s3://b/mvtec --category bottle --out s3://b/pairs \\\n"
        "      --layout webdataset --source both --textures dtd/images --ray-address auto"
    ),
)
@click.argument("sia_root", required=False)
@click.option("--data", required=True, help="MVTec-layout root holding CATEGORY/train/good.")
@click.option("--category", required=True, help="Category to export.")
@click.option(
    "--out", required=True, help="Output root (folder, file:// or s3://); writes OUT/CATEGORY."
)
@click.option(
    "--per-image",
    type=Number(int, 1, MAX_PER_IMAGE),
    default=1,
    help="Anomaly images per normal image.",
)
@click.option("--layout", type=click.Choice(LAYOUTS), default="mvtec", help="Output layout.")
@click.option(
    "--source",
    type=click.Choice(["sia", "texture", "both"]),
    default="sia",
    help="Anomaly source: SIA samples, textures (--textures), or each output 50/50.",
)
@click.option("--textures", default=None, help="Texture image folder (DTD images/) for texture.")
@click.option("--strengths", default=None, help="Use SIA samples with strength in LO:HI.")
@click.option(
    "--holdout",
    type=float,
    default=HOLDOUT,
    help="Share of the normal images held out (seeded hash): anomalies go only into these, "
    "written as test normals; the rest are training normals. In (0, 1).",
)
@click.option("--seed", type=SEED, default=0, help="Every output's seed is hashed from it.")
@click.option(
    "--image-size",
    type=Number(int, 16, MAX_SIDE),
    default=256,
    help="Output side (long side; padded square).",
)
@click.option(
    "--foreground",
    type=click.Choice(CHOICES),
    default=None,
    help="Where anomalies may go [default: the authors' rule for a known category, else auto].",
)
@click.option("--preview", is_flag=True, help="Also write OUT/CATEGORY/preview.png (image | mask).")
@click.option(
    "--workers",
    type=Number(int, 0, MAX_WORKERS),
    default=None,
    help="Ray tasks at a time [default: CPUs]; 0: no Ray.",
)
@click.option("--ray-address", default=None, help="Join this Ray cluster [default: a local Ray].")
@s3_endpoint_option()
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(**kw) -> None:
    """Compose anomalies into the normal images of a category, as realnet-train does, and
    write each anomaly image with its 0/255 mask, a metadata.jsonl row per output and
    export.json. Deterministic: the same command gives the same bytes; a rerun resumes."""
    setup_logging(kw["verbose"])
    from sia_pipeline.export.export import ExportError, ExportFailed, ExportSpec, export
    from sia_pipeline.format.v1 import FormatError

    if not 0 < kw["holdout"] < 1:
        die(f"--holdout must be in (0, 1), got {kw['holdout']}")
    try:
        strengths = _check_inputs(kw)
    except InputError as e:
        die(str(e))
    spec = ExportSpec(
        category=kw["category"],
        data=kw["data"],
        sia=kw["sia_root"],
        textures=kw["textures"],
        per_image=kw["per_image"],
        layout=kw["layout"],
        source=kw["source"],
        seed=kw["seed"],
        size=kw["image_size"],
        foreground=kw["foreground"],
        strengths=strengths,
        holdout=kw["holdout"],
    )
    try:
        report = export(
            spec,
            kw["out"],
            workers=kw["workers"],
            ray_address=kw["ray_address"],
            preview=kw["preview"],
            progress=not kw["no_progress"],
            endpoint_url=kw["s3_endpoint_url"],
        )
    except (ExportError, FormatError) as e:  # FormatError: an undecodable normal image
        die(str(e))
    except ExportFailed as e:
        die(str(e), 1)
    except KeyboardInterrupt:
        die("interrupted; rerun the same command to finish", 130)
    click.echo(report.summary())


if __name__ == "__main__":
    main()
