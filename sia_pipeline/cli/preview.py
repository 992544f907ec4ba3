"""``sia-preview``: sample a model at a few strengths into one labelled grid PNG."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from sia_pipeline.cli._common import STRENGTH_MIN_T_HELP, SiaCommand, die, parse_list, setup_logging
from sia_pipeline.format.genspec import MAX_STRENGTH, PRECISIONS, SAMPLERS
from sia_pipeline.gen.options import DATASET
from sia_pipeline.io.inputs import (
    MAX_SEED,
    STEPS,
    TIMESTEP,
    InputError,
    Number,
    check_input,
    check_memory,
    check_output,
)

PREVIEW_FILE = "preview.png"


def default_out(model: str | None) -> str:
    """``preview.png`` beside a local model folder; in the current folder for the bundled
    model or an ``s3://`` one (never over the package's or the README's files)."""
    if model and "://" not in model.removeprefix("file://"):
        folder = Path(model.removeprefix("file://")).expanduser()
        if folder.is_dir():
            return str(folder / PREVIEW_FILE)
    return PREVIEW_FILE


@click.command(
    "sia-preview",
    cls=SiaCommand,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
)
@click.option("--model", help="Model folder or s3:// URL [default: the bundled demo model].")
@click.option(
    "--strengths",
    default="0,0.1,0.3,0.5",
    help="Comma-separated anomaly strengths, one grid block each.",
)
@click.option(
    "--per-strength", type=Number(int, 1, 64), default=6, help="Samples per category and strength."
)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=DATASET.sampler)
@click.option(
    "--steps", type=STEPS, default=DATASET.steps, help="Respaced sampling steps (of T = 1000)."
)
@click.option(
    "--seed",
    type=Number(int, 0, MAX_SEED - 64),
    default=0,
    help="First seed; sample j uses seed + j, at every strength.",
)
@click.option(
    "--scale", type=Number(int, 1, 16), default=3, help="Upscale factor of the tiles in the PNG."
)
@click.option("--classifier", default=None, help="Noisy classifier folder for guidance.")
@click.option(
    "--classifier-scale",
    type=Number(float),
    default=DATASET.classifier_scale,
    help="Guidance scale (with --classifier).",
)
@click.option("--precision", type=click.Choice(PRECISIONS), default=DATASET.precision)
@click.option(
    "--strength-min-t",
    type=TIMESTEP,
    default=DATASET.strength_min_t,
    help=STRENGTH_MIN_T_HELP,
)
@click.option("--compile", is_flag=True, help="torch.compile the UNet.")
@click.option("--device", default=None, help="Torch device [default: cuda if present, else cpu].")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Image to write, PNG (JPEG if named .jpg) [default: preview.png beside a local "
    "--model, else in the current folder].",
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    model,
    strengths,
    per_strength,
    sampler,
    steps,
    seed,
    scale,
    classifier,
    classifier_scale,
    precision,
    strength_min_t,
    compile,
    device,
    out,
    verbose,
) -> None:
    """Rows: category x strength; columns: the same seeds, so a row differs only by s."""
    setup_logging(verbose)
    from sia_pipeline.diffusion.guidance import GuidanceError, check_scale, load_guidance
    from sia_pipeline.diffusion.model import ModelError, load_model
    from sia_pipeline.diffusion.sampler import Sampler, check_strength_min_t
    from sia_pipeline.format.preview import make_grid

    try:
        values = [float(s) for s in parse_list(strengths)]
    except ValueError:
        die(f"--strengths must be comma-separated numbers, got {strengths!r}")
    if not values or len(values) > 64:
        die(f"--strengths must hold 1 to 64 values, got {strengths!r}")
    if any(not (math.isfinite(v) and 0 <= v <= MAX_STRENGTH) for v in values):
        die(f"--strengths must be finite and in [0, {MAX_STRENGTH:g}], got {strengths!r}")
    try:
        check_input(model, "--model")
        check_input(classifier, "--classifier")
        if out is not None:
            check_output(out, "--out", kind="file")
            if Path(out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
                die(f"--out {out}: the grid is written as .png, .jpg or .jpeg")
    except InputError as e:
        die(str(e))
    guidance = None
    try:
        if classifier:
            check_scale(classifier_scale)
        device = _device(device)
        m = load_model(model, device=device)
        if classifier:
            guidance, _ = load_guidance(
                classifier, classifier_scale, m.categories, m.resolution, device=device
            )
    except (ModelError, GuidanceError) as e:
        die(str(e))
    tile = m.resolution * scale
    n_tiles = len(m.categories) * len(values) * per_strength
    try:  # the grid (RGB, plus PIL's copy while encoding)
        check_memory(n_tiles * tile * tile * 3 * 2, f"a grid of {n_tiles} tiles of {tile} px")
    except InputError as e:
        die(str(e))
    try:
        check_strength_min_t(strength_min_t, m.num_train_timesteps)
    except ValueError as e:
        die(f"--strength-min-t {strength_min_t}: {e}")
    try:
        smp = Sampler(
            m,
            sampler,
            steps,
            guidance=guidance,
            precision=precision,
            compile=compile,
            strength_min_t=strength_min_t,
        )
    except ValueError as e:  # steps beyond the model's T
        die(f"--steps {steps}: {e}")
    rows, labels = [], []
    seeds = [seed + j for j in range(per_strength)]
    t0 = time.perf_counter()
    for cat in m.categories:
        for s in values:
            rows.append(list(smp.sample([cat] * per_strength, [s] * per_strength, seeds)))
            labels.append(f"{cat} s={s:g}")
    dt = time.perf_counter() - t0
    out = out or default_out(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, row_labels=labels, scale=scale).save(out)
    n = len(rows) * per_strength
    click.echo(f"{n} samples in {dt:.1f} s ({n / dt:.1f} images/s) -> {out}")


def _device(name: str | None) -> str:
    """``--device``: a torch device this machine has (None: cuda if present, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        die(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name}: this machine has no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        die(f"--device {name}: use cpu or cuda")
    return name


if __name__ == "__main__":
    main()
