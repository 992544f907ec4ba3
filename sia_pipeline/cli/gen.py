"""``sia-gen``: distributed SDAS generation into a sharded SIA dataset (format v1).

Thin: parses options and calls :func:`sia_pipeline.gen.generate.generate` with the same
keyword arguments. Bad input exits 2 with one line; failed shards exit 1.
"""

from __future__ import annotations

import click

from sia_pipeline.cli._common import (
    STRENGTH_MIN_T_HELP,
    SiaCommand,
    die,
    s3_endpoint_option,
    setup_logging,
    storage_failure,
)
from sia_pipeline.format.genspec import PRECISIONS, SAMPLERS, PlanError, parse_strengths
from sia_pipeline.format.v1 import IMAGE_EXTS
from sia_pipeline.gen.options import DATASET, RUN
from sia_pipeline.gen.plan import MAX_SHARD_SIZE
from sia_pipeline.io.inputs import (
    BATCH,
    MAX_COUNT,
    MAX_WORKERS,
    SEED,
    STEPS,
    TIMESTEP,
    Number,
)


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
    default=DATASET.categories,
    help="Comma-separated category names, or 'all' for every category of the model.",
)
@click.option(
    "--strengths",
    default=DATASET.strengths,
    help="Anomaly strengths s: 'a:b' uniform per sample, 'a:b:step' a grid (each value "
    "equally often), 'a,b,c' a list (round-robin). All >= 0.",
)
@click.option(
    "--per-category",
    type=Number(int, 1, MAX_COUNT),
    default=DATASET.per_category,
    help="Images per category (the default is demo-sized: a few minutes on 2 CPU cores "
    "with the bundled model; the paper used 10000).",
)
@click.option(
    "--shard-size",
    type=Number(int, 1, MAX_SHARD_SIZE),
    default=DATASET.shard_size,
    help="Images per tar shard.",
)
@click.option(
    "--seed",
    type=SEED,
    default=DATASET.seed,
    help="Global seed; per-sample seeds are hashed from it.",
)
@click.option(
    "--sampler", type=click.Choice(SAMPLERS), default=DATASET.sampler, help="SDAS sampler."
)
@click.option(
    "--steps", type=STEPS, default=DATASET.steps, help="Respaced sampling steps (of the model's T)."
)
@click.option(
    "--eta", type=Number(float, 0, 1), default=DATASET.eta, help="DDIM eta (ignored by ddpm)."
)
@click.option(
    "--batch-size", type=BATCH, default=RUN.batch_size, help="Images sampled together per worker."
)
@click.option(
    "--image-format",
    type=click.Choice(IMAGE_EXTS),
    default=DATASET.image_format,
    help="Image encoding.",
)
@click.option(
    "--model",
    default=DATASET.model,
    help="SDAS model folder, file:// or s3:// URL [default: the bundled demo model].",
)
@click.option(
    "--classifier",
    default=DATASET.classifier,
    help="Noisy classifier folder (file:// or s3://) for classifier guidance [default: none].",
)
@click.option(
    "--classifier-scale",
    type=Number(float),
    default=DATASET.classifier_scale,
    help="Guidance scale (the authors' classifier_scale); with --classifier only.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=DATASET.precision,
    help="UNet autocast precision (part of the spec: it changes the images).",
)
@click.option(
    "--strength-min-t",
    type=TIMESTEP,
    default=DATASET.strength_min_t,
    help=STRENGTH_MIN_T_HELP + " Part of the spec.",
)
@click.option("--compile", is_flag=True, help="torch.compile the UNet in every actor (GPU speed).")
@click.option(
    "--out",
    default=DATASET.out,
    help="Dataset root: a local folder, file:// or s3://bucket/prefix.",
)
@s3_endpoint_option()
@click.option(
    "--workers",
    type=Number(int, 1, MAX_WORKERS),
    default=RUN.workers,
    help="Sampling actors. CPU: default one per CPU (with --threads-per-worker 1); "
    "GPU: default one per --gpus-per-worker GPUs (this caps it).",
)
@click.option(
    "--gpus-per-worker",
    type=float,
    default=RUN.gpus_per_worker,
    help="GPUs per actor where the cluster has GPUs (fractional shares a GPU).",
)
@click.option(
    "--threads-per-worker",
    type=Number(int, 1, 1024),
    default=RUN.threads_per_worker,
    help="Torch threads (and CPUs reserved) per CPU actor [default: 1, or CPUs / --workers].",
)
@click.option(
    "--ray-address",
    default=RUN.ray_address,
    help="Join this Ray cluster ('auto' or ray://host:10001) [default: start a local Ray].",
)
@click.option(
    "--ray-timeout",
    type=Number(float, 0, 86400, lo_open=True),
    default=RUN.ray_timeout,
    help="Seconds to wait for --ray-address to answer before giving up (exit 2).",
)
@click.option(
    "--max-in-flight",
    type=Number(int, 1, 64),
    default=RUN.max_in_flight,
    help="Shard tasks queued per actor at a time.",
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
    type=Number(float, 0, 7 * 86400),
    default=RUN.lease_ttl,
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
    type=Number(float, 0.1, 86400),
    default=RUN.progress_interval,
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
    from sia_pipeline.io.inputs import InputError, check_input, check_output
    from sia_pipeline.io.storage import StorageError

    try:
        check_input(kwargs["model"], "--model")
        check_input(kwargs["classifier"], "--classifier")
        sources = {"--model": kwargs["model"], "--classifier": kwargs["classifier"]}
        check_output(kwargs["out"], "--out", sources)
        parse_strengths(kwargs["strengths"])  # before torch and Ray are imported
    except (InputError, PlanError) as e:
        die(str(e))
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
