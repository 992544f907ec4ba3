"""``sia-gen``: distributed SDAS generation into a sharded SIA dataset (format v1).

Thin: parses options and calls :func:`sia_pipeline.gen.generate.generate` with the same
keyword arguments. Bad input exits 2 with one line; failed shards exit 1.
"""

from __future__ import annotations

import click

from sia_pipeline.cli._common import (
    SiaCommand,
    die,
    s3_endpoint_option,
    setup_logging,
    storage_failure,
)
from sia_pipeline.gen.generate import DEFAULT_OUT, DEFAULT_PER_CATEGORY
from sia_pipeline.io.lease import DEFAULT_TTL
from sia_pipeline.io.raycluster import DEFAULT_RAY_TIMEOUT_S


@click.command(
    "sia-gen",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
    epilog=(
        "\b\nExamples:\n"
        "  sia-gen --categories all --strengths 0.1:0.5\n"
        "  sia-gen --categories bottle --strengths 0.1:0.5:0.1 --per-category 10000 \\\n"
        "      --out s3://bucket/sia --ray-address auto"
    ),
)
@click.option(
    "--categories",
    default="all",
    help="Comma-separated category names, or 'all' for every category of the model.",
)
@click.option(
    "--strengths",
    default="0.1:0.5",
    help="Anomaly strengths s: 'a:b' uniform per sample, 'a:b:step' a grid (each value "
    "equally often), 'a,b,c' a list (round-robin). All >= 0.",
)
@click.option(
    "--per-category",
    type=int,
    default=DEFAULT_PER_CATEGORY,
    help="Images per category (the default is demo-sized: about a minute on 2 CPU cores "
    "with the bundled model; the paper used 10000).",
)
@click.option("--shard-size", type=int, default=1000, help="Images per tar shard.")
@click.option(
    "--seed", type=int, default=0, help="Global seed; per-sample seeds are hashed from it."
)
@click.option(
    "--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", help="SDAS sampler."
)
@click.option("--steps", type=int, default=20, help="Respaced sampling steps (of the model's T).")
@click.option("--eta", type=float, default=0.0, help="DDIM eta (ignored by ddpm).")
@click.option("--batch-size", type=int, default=16, help="Images sampled together per worker.")
@click.option(
    "--image-format", type=click.Choice(["png", "jpg"]), default="png", help="Image encoding."
)
@click.option(
    "--model",
    default=None,
    help="SDAS model folder, file:// or s3:// URL [default: the bundled demo model].",
)
@click.option(
    "--classifier",
    default=None,
    help="Noisy classifier folder (file:// or s3://) for classifier guidance [default: none].",
)
@click.option(
    "--classifier-scale",
    type=float,
    default=1.0,
    help="Guidance scale (the authors' classifier_scale); with --classifier only.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    help="UNet autocast precision (part of the spec: it changes the images).",
)
@click.option("--compile", is_flag=True, help="torch.compile the UNet in every actor (GPU speed).")
@click.option(
    "--out",
    default=DEFAULT_OUT,
    help="Dataset root: a local folder, file:// or s3://bucket/prefix.",
)
@s3_endpoint_option()
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Sampling actors. CPU: default one per CPU (with --threads-per-worker 1); "
    "GPU: default one per --gpus-per-worker GPUs (this caps it).",
)
@click.option(
    "--gpus-per-worker",
    type=float,
    default=1.0,
    help="GPUs per actor where the cluster has GPUs (fractional shares a GPU).",
)
@click.option(
    "--threads-per-worker",
    type=int,
    default=None,
    help="Torch threads (and CPUs reserved) per CPU actor [default: 1, or CPUs / --workers].",
)
@click.option(
    "--ray-address",
    default=None,
    help="Join this Ray cluster ('auto' or ray://host:10001) [default: start a local Ray].",
)
@click.option(
    "--ray-timeout",
    type=float,
    default=DEFAULT_RAY_TIMEOUT_S,
    help="Seconds to wait for --ray-address to answer before giving up (exit 2).",
)
@click.option(
    "--max-in-flight", type=int, default=2, help="Shard tasks queued per actor at a time."
)
@click.option("--overwrite", is_flag=True, help="Replace a dataset of a different spec at --out.")
@click.option(
    "--extend",
    is_flag=True,
    help="Grow the dataset at --out to --per-category images per category: its shards "
    "stay as they are, new shards are appended (every other option must match it).",
)
@click.option(
    "--lease-ttl",
    type=float,
    default=DEFAULT_TTL,
    help="Seconds the root's lease (one writer per root) outlives a driver that stops "
    "renewing it: how long a crashed run can block a rerun from another host.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (shards, images, bytes); write nothing."
)
@click.option(
    "--no-progress",
    is_flag=True,
    help="No progress bar: a log line every --progress-interval seconds instead (as when "
    "stderr is not a terminal).",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    help="Seconds between progress log lines when there is no bar.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(no_progress: bool, verbose: bool, **kwargs) -> None:
    """Generate synthetic industrial anomalies with SDAS into a sharded SIA dataset.

    Writes WebDataset tar shards, per-shard stats, manifest.parquet, index.json and a
    README.md card under --out. Rerunning the same command resumes: done shards are
    skipped, and a finished dataset is left untouched.
    """
    setup_logging(verbose)
    from sia_pipeline.gen.generate import GenError, GenFailed, generate
    from sia_pipeline.io.storage import StorageError

    try:
        report = generate(progress=not no_progress, **kwargs)
    except StorageError as e:  # e.g. writing the index after every shard is stored
        storage_failure(e)
    except GenError as e:
        die(str(e))
    except GenFailed as e:
        die(str(e), 1)
    except KeyboardInterrupt:
        die("interrupted; rerun the same command to finish the missing shards", 130)
    if report.dry_run:
        click.echo(report.plan)
    click.echo(report.summary())


if __name__ == "__main__":
    main()
