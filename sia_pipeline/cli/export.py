"""``sia-export``: anomaly image + mask pairs in MVTec AD, anomalib Folder or WebDataset layout.

Thin: parses options and calls :func:`sia_pipeline.export.export.export`. Bad input exits 2
with one line before anything is written; units that keep failing exit 1 (rerun to finish).
"""

from __future__ import annotations

import click

from sia_pipeline.cli._common import SiaCommand, die, s3_endpoint_option, setup_logging
from sia_pipeline.compose.foreground import CHOICES
from sia_pipeline.export.export_layouts import LAYOUTS


def _strengths(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        out = (float(lo), float(hi if sep else lo))
    except ValueError:
        die(f"--strengths {text!r} is not LO:HI")
    if not out[0] <= out[1]:
        die(f"--strengths {text!r} needs LO <= HI")
    return out


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
@click.option("--per-image", type=int, default=1, help="Anomaly images per normal image.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="mvtec", help="Output layout.")
@click.option(
    "--source",
    type=click.Choice(["sia", "texture", "both"]),
    default="sia",
    help="Anomaly source: SIA samples, textures (--textures), or each output 50/50.",
)
@click.option("--textures", default=None, help="Texture image folder (DTD images/) for texture.")
@click.option("--strengths", default=None, help="Use SIA samples with strength in LO:HI.")
@click.option("--seed", type=int, default=0, help="Every output's seed is hashed from it.")
@click.option("--image-size", type=int, default=256, help="Output side (long side; padded square).")
@click.option(
    "--foreground",
    type=click.Choice(CHOICES),
    default=None,
    help="Where anomalies may go [default: the authors' rule for a known category, else auto].",
)
@click.option("--preview", is_flag=True, help="Also write OUT/CATEGORY/preview.png (image | mask).")
@click.option(
    "--workers", type=int, default=None, help="Ray tasks at a time [default: CPUs]; 0: no Ray."
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

    if kw["workers"] is not None and kw["workers"] < 0:
        die(f"--workers must be >= 0, got {kw['workers']}")
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
        strengths=_strengths(kw["strengths"]),
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
    except ExportError as e:
        die(str(e))
    except ExportFailed as e:
        die(str(e), 1)
    except KeyboardInterrupt:
        die("interrupted; rerun the same command to finish", 130)
    click.echo(report.summary())


if __name__ == "__main__":
    main()
