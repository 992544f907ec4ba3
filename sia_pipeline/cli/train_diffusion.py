"""``sia-train-diffusion``: train the SDAS diffusion model on normal images."""

from __future__ import annotations

import click

from sia_pipeline.cli._common import SiaCommand, die, parse_list, s3_endpoint_option, setup_logging
from sia_pipeline.diffusion.presets import DEFAULT_PRESET, PRESETS
from sia_pipeline.io.inputs import (
    BATCH,
    MAX_SIDE,
    SEED,
    InputError,
    Number,
    check_input,
    check_output,
)
from sia_pipeline.io.storage import StorageError


@click.command(
    "sia-train-diffusion",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--data",
    required=True,
    multiple=True,
    help="MVTec-layout root (folder or s3://); repeat for several. Reads CATEGORY/train/good/*.",
)
@click.option(
    "--categories",
    required=True,
    help="Comma-separated categories; one class id each, in this order.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Model folder to write (checkpoints go in OUT/checkpoints).",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=DEFAULT_PRESET,
    help="UNet size and defaults: small-cpu (the bundled model's recipe: 128 px, learned "
    "variance, 7200 steps, about 3 h on 2 CPU cores), tiny-cpu (32 px, minutes), paper-gpu "
    "(the authors' 256 px ADM).",
)
@click.option(
    "--resolution",
    type=Number(int, 8, MAX_SIDE),
    help="Training resolution in px [default: the preset's].",
)
@click.option(
    "--steps", type=Number(int, 1, 10**9), help="Optimiser steps [default: the preset's]."
)
@click.option(
    "--batch-size", type=BATCH, help="Batch size per process (per GPU) [default: the preset's]."
)
@click.option(
    "--lr",
    "learning_rate",
    type=Number(float, 0, 1, lo_open=True),
    help="AdamW learning rate [default: the preset's].",
)
@click.option(
    "--checkpoint-every",
    type=Number(int, 1, 10**9),
    help="Steps between checkpoints [default: the preset's].",
)
@click.option(
    "--ema-decay",
    type=Number(float, 0, 1, hi_open=True),
    help="EMA decay of the saved weights [default: the preset's].",
)
@click.option(
    "--grad-accumulation",
    type=Number(int, 1, 1024),
    help="Micro-batches per optimiser step [default: the preset's; paper-gpu: 3, as the authors].",
)
@click.option(
    "--grad-clip",
    type=Number(float, 0, 1e6, lo_open=True),
    default=1.0,
    help="Gradient norm clipping.",
)
@click.option(
    "--init-from",
    help="Start from this model folder (e.g. from sia-convert-adm): same architecture, class "
    "embeddings kept for categories it knows by name, new ones for the others.",
)
@click.option(
    "--hflip/--no-hflip",
    default=False,
    help="Random horizontal flips (only for flip-invariant categories).",
)
@click.option(
    "--learn-sigma/--fixed-sigma",
    default=None,
    help="Predict the reverse variance (learned range, hybrid loss), as official SDAS models "
    "do [default: the preset's, or the --init-from model's].",
)
@click.option("--seed", type=SEED, default=0, help="Seed of initialisation and batch order.")
@click.option(
    "--resume", is_flag=True, help="Continue from the latest checkpoint in OUT/checkpoints."
)
@click.option("--half", is_flag=True, help="Store fp16 weights (half the size; loading upcasts).")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="UNet autocast dtype while training (weights and optimizer stay float32).",
)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--threads", type=Number(int, 1, 1024), help="torch CPU threads [default: torch's choice]."
)
@s3_endpoint_option("endpoint_url")
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool, categories: str, data: tuple[str, ...], **kwargs) -> None:
    """Train a class-conditional SDAS diffusion model and save it in diffusers format.

    Multi-GPU: run it under torchrun (one process per GPU, DDP); --batch-size is per process.

    Example: sia-train-diffusion --data ../shared/data/mvtec_ad --categories bottle --out runs/m
    """
    setup_logging(verbose)
    import torch.distributed as dist

    from sia_pipeline.diffusion.train import TrainConfig, train

    try:
        for url in data:
            check_input(url, "--data")
        check_input(kwargs["init_from"], "--init-from")
        sources = {f"--data {i + 1}": url for i, url in enumerate(data)}
        check_output(kwargs["out"], "--out", sources | {"--init-from": kwargs["init_from"]})
    except InputError as e:
        die(str(e))
    try:
        cfg = TrainConfig(data=list(data), categories=parse_list(categories), **kwargs)
        model_id = train(cfg)
    except (ValueError, StorageError) as e:
        die(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if model_id:  # rank 0 (or the only process)
        click.echo(f"model {model_id} -> {cfg.out}")


if __name__ == "__main__":
    main()
