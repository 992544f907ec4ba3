"""``sia-convert-adm``: the authors' ADM checkpoints -> our model and classifier folders."""

from __future__ import annotations

from pathlib import Path

import click

from sia_pipeline.cli._common import SiaCommand, die, parse_list, setup_logging
from sia_pipeline.io.inputs import (
    MAX_SIDE,
    InputError,
    Number,
    check_input,
    check_memory,
    check_output,
)


def _ints(value: str, name: str, hi: int) -> tuple[int, ...]:
    """Comma-separated integers in [1, hi], at most 16 of them."""
    try:
        out = tuple(int(v) for v in parse_list(value))
    except ValueError:
        die(f"--{name}: expected comma-separated integers, got {value!r}")
    if not out or len(out) > 16 or min(out) < 1 or max(out) > hi:
        die(f"--{name}: expected 1 to 16 integers in [1, {hi}], got {value!r}")
    return out


def _param_bytes(width: int, mults: tuple[int, ...], blocks: int) -> int:
    """Rough float32 bytes of an ADM UNet's weights, held about three times during a
    conversion (the checkpoint, the mapped state dict, the diffusers model): two 3x3
    convolutions per res block, down and up, plus attention and skips (x 30 per w^2)."""
    return 3 * 4 * 30 * (blocks + 1) * sum((width * m) ** 2 for m in mults)


@click.command(
    "sia-convert-adm",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
)
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option(
    "--kind",
    type=click.Choice(["unet", "classifier"]),
    default="unet",
    help="unet: the diffusion model (model folder for sia-gen); classifier: the noisy "
    "classifier for guidance (classifier folder for --classifier).",
)
@click.option(
    "--dataset",
    type=click.Choice(["mvtec", "visa", "mpdd", "btad", "imagenet"]),
    default="mvtec",
    help="Class names in the authors' order for this data set (imagenet: OpenAI's 1000 "
    "classes, named imagenet_000 ...).",
)
@click.option(
    "--categories", help="Comma-separated class names in class-id order [overrides --dataset]."
)
@click.option(
    "--image-size",
    type=Number(int, 8, MAX_SIDE),
    default=256,
    help="Image size in px (config: image_size).",
)
@click.option(
    "--model-channels",
    "--classifier-width",
    "model_channels",
    type=Number(int, 32, 4096),
    help="Base width (config: classifier_width) [default: 256 unet, 128 classifier].",
)
@click.option("--channel-mult", default="1,1,2,2,4,4", help="Width multiplier per level.")
@click.option(
    "--num-res-blocks",
    "--classifier-depth",
    "num_res_blocks",
    type=Number(int, 1, 16),
    default=2,
    help="Residual blocks per level (config: classifier_depth).",
)
@click.option(
    "--attention-resolutions",
    default="32,16,8",
    help="Downsample rates with attention, as the authors' code reads them (at 256 px the "
    "same places as OpenAI's 32,16,8).",
)
@click.option(
    "--num-head-channels",
    type=Number(int, 1, 4096),
    default=64,
    help="Channels per attention head.",
)
@click.option(
    "--learn-sigma/--fixed-sigma",
    default=True,
    help="UNet predicts the variance too (6 output channels), as the released models do.",
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    checkpoint: str,
    out: str,
    kind: str,
    dataset: str,
    categories: str | None,
    image_size: int,
    model_channels: int | None,
    channel_mult: str,
    num_res_blocks: int,
    attention_resolutions: str,
    num_head_channels: int,
    learn_sigma: bool,
    verbose: bool,
) -> None:
    """Convert an ADM diffusion UNet or noisy classifier checkpoint (OpenAI's or RealNet's).

    Reads a bare state dict (256x256_diffusion.pt) or the authors' {"state_dict": ...} saves
    without running pickled code, checks every key and shape, and writes a folder that
    sia-gen / sia-preview / sia-inspect load unchanged.

    Example: sia-convert-adm mvtec_diffusion_ckpt_epoch_240.pt --out models/sdas-mvtec
    """
    setup_logging(verbose)
    from sia_pipeline.diffusion.adm import DATASET_CATEGORIES, ADMArch, CheckpointError
    from sia_pipeline.diffusion.convert import convert_checkpoint

    try:
        check_input(checkpoint, "CHECKPOINT", "file")
        check_output(out, "--out", {"CHECKPOINT": checkpoint})
    except InputError as e:
        die(str(e))
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        die(f"--out {out} exists and is not empty; choose a new folder")
    cats = parse_list(categories) if categories else list(DATASET_CATEGORIES[dataset])
    mults = _ints(channel_mult, "channel-mult", 64)
    width = model_channels or (256 if kind == "unet" else 128)
    try:
        check_memory(_param_bytes(width, mults, num_res_blocks), "this architecture")
        arch = ADMArch(
            image_size=image_size,
            model_channels=width,
            channel_mult=mults,
            num_res_blocks=num_res_blocks,
            attention_resolutions=_ints(attention_resolutions, "attention-resolutions", MAX_SIDE),
            num_head_channels=num_head_channels,
            learn_sigma=learn_sigma and kind == "unet",
        )
    except ValueError as e:  # InputError too
        die(str(e))
    extra = {} if categories else {"dataset": dataset}
    try:
        ident = convert_checkpoint(checkpoint, out, cats, arch, kind, extra)
    except (CheckpointError, ValueError) as e:
        die(str(e))
    except (OSError, RuntimeError) as e:
        die(f"{e}; check free disk space and memory (a 256 px UNet needs about 5 GB)", 1)
    click.echo(f"{kind} {ident} -> {out}")


if __name__ == "__main__":
    main()
