"""``realnet-train`` and ``realnet-eval``: thin click wrappers around train() and evaluate().

Every input is checked first (:mod:`realnet_train.preflight`): bad input exits 2 with one line
``PROG: error: ...`` before any folder is made; a runtime failure exits 1 with one line.
``realnet-train`` also runs under ``torchrun --nproc_per_node N`` (one process per GPU, or
gloo processes on CPU); see :mod:`realnet_train.distributed`.
"""

from __future__ import annotations

import json
import logging
import os

import click

from realnet_train.cli_common import (
    CONTEXT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY_OPEN,
    InputError,
    Number,
    OneLineCommand,
    die,
    s3_endpoint_option,
    setup_logging,
)
from realnet_train.model.config import RealNetConfig
from realnet_train.presets import (
    DEFAULT_PRESET,
    LR_SCHEDULES,
    PRESETS,
    help_text,
    preset_values,
    resolve,
)
from sia_pipeline.compose.foreground import CHOICES as FOREGROUND_CHOICES
from sia_pipeline.compose.resize import FITS

log = logging.getLogger(__name__)


def default_mix(sia: str | None, textures: str | None) -> str:
    """p_anomaly = 0.5, split evenly over the sources given."""
    if sia and textures:
        return "normal=0.5,sia=0.25,texture=0.25"
    if textures:
        return "normal=0.5,texture=0.5"
    return "normal=0.5,sia=0.5"


def run_or_die(fn, *args, verbose: bool = False, hint: str = ""):
    """Call ``fn``; a runtime failure becomes one line and exit 1 (traceback with -v)."""
    try:
        return fn(*args)
    except InputError as e:
        die(e)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, not a traceback
        if verbose:
            raise
        die(f"{type(e).__name__}: {e}{hint} (rerun with -v for the traceback)", 1)


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"24,40"`` -> (24, 40); ``None`` stays ``None`` (the preset's value)."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        msg = f"{option} {text!r} is not a comma-separated list of integers"
        raise InputError(msg) from None
    if any(v < 0 for v in values):
        msg = f"{option} {text!r} must not hold negative numbers"
        raise InputError(msg)
    return values


def backbone_channels(name: str) -> list[int]:
    """Channels of each feature level of a timm backbone (built on the meta device: no
    weights, no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return [info["num_chs"] for info in model.feature_info]


def preset_config(kw: dict) -> tuple[dict, RealNetConfig]:
    """The preset with the options given laid over it: (train settings, model config).

    Raises ``InputError`` when out of range, or when ``--preset paper`` lacks its weights file.
    """
    levels = parse_int_list(kw["levels"], "--levels")
    if levels is not None and (
        not levels or any(lv > 4 for lv in levels) or len(set(levels)) < len(levels)
    ):
        msg = f"--levels {kw['levels']!r} must be distinct backbone levels in 0..4"
        raise InputError(msg)
    counts = parse_int_list(kw["rrs_counts"], "--rrs-counts")
    if counts is not None and (len(counts) != 2 or min(counts) < 1):
        msg = f"--rrs-counts {kw['rrs_counts']!r} must be two numbers >= 1 (MAX,MEAN)"
        raise InputError(msg)
    keep = parse_int_list(kw["afs_keep"], "--afs-keep")
    if keep is not None and min(keep, default=0) < 1:
        msg = f"--afs-keep {kw['afs_keep']!r} must be numbers >= 1, one per level"
        raise InputError(msg)
    if kw["recon_width"] is not None and (kw["recon_width"] < 32 or kw["recon_width"] % 32):
        msg = f"--recon-width must be a multiple of 32 (GroupNorm groups), got {kw['recon_width']}"
        raise InputError(msg)
    if kw["backbone_weights"]:
        from realnet_train.preflight import check_readable

        check_readable(kw["backbone_weights"], "--backbone-weights", folder=False)
    if kw["backbone"] is not None:
        import timm

        if not timm.is_model(kw["backbone"]):
            msg = f"--backbone {kw['backbone']!r} is not a timm model name"
            raise InputError(msg)
    model_kw = {
        "backbone": kw["backbone"],
        "backbone_weights": kw["backbone_weights"],
        "levels": levels,
        "afs_keep": keep,
        "recon_width": kw["recon_width"],
        "rrs_counts": counts,
    }
    train_kw = {
        "image_size": kw["image_size"],
        "crop_size": kw["crop_size"],
        "resize": kw["resize"],
        "batch_size": kw["batch_size"],
        "steps": kw["steps"],
        "time_budget_s": kw["time_budget"],
        "lr": kw["lr"],
        "lr_schedule": kw["lr_schedule"],
        "afs_batches": kw["afs_batches"],
    }
    try:
        train_kw, model = resolve(kw["preset"], train_kw, model_kw)
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None
    if len(model.afs_keep) != len(model.levels):
        msg = f"--afs-keep {list(model.afs_keep)} needs one count per level {list(model.levels)}"
        raise InputError(msg)
    channels = backbone_channels(model.backbone)
    for lv, k in zip(model.levels, model.afs_keep, strict=True):
        if lv >= len(channels) or k > channels[lv]:
            have = f"{channels[lv]}" if lv < len(channels) else "no such level"
            msg = f"--afs-keep: AFS keeps {k} channels of level{lv}, which has {have}"
            raise InputError(msg)
    # The coarsest level (stride 2 ** (level + 1)) must halve (multipliers - 1) times.
    size = train_kw["image_size"]
    coarsest = 2 ** (max(model.levels) + 1) * 2 ** (len(model.recon_channel_mult) - 1)
    if size % coarsest:
        msg = (
            f"--image-size {size} must be a multiple of {coarsest} for levels {list(model.levels)}"
        )
        raise InputError(msg)
    crop = train_kw["crop_size"]
    if crop is not None and (crop % coarsest or crop > size):
        msg = f"--crop-size {crop} must be a multiple of {coarsest} and at most --image-size {size}"
        raise InputError(msg)
    return train_kw, model


def train_config(kw: dict):
    """All of ``realnet-train``'s checks; the :class:`TrainConfig` (creates nothing)."""
    from realnet_train import preflight

    endpoint = kw["s3_endpoint_url"]
    sources = {"--data": kw["data"], "--sia": kw["sia"], "--textures": kw["textures"]}
    out = preflight.check_out(kw["out"], inputs=sources)
    mvtec = preflight.open_category(kw["data"], kw["category"], endpoint)
    if not kw["sia"] and not kw["textures"]:
        msg = "give an anomaly source: --sia URL and/or --textures DIR"
        raise InputError(msg)
    mix = kw["mix"] or default_mix(kw["sia"], kw["textures"])
    preflight.check_mix(mix, kw["sia"], kw["textures"])
    strengths = preflight.parse_range(kw["strengths"])
    if strengths is not None and not kw["sia"]:
        msg = "--strengths filters SIA samples: give --sia too"
        raise InputError(msg)
    if kw["sia"]:
        preflight.check_sia(kw["sia"], kw["category"], strengths, endpoint)
    train_kw, model = preset_config(kw)  # after the paths: it builds the backbone (meta device)
    if kw["textures"]:
        preflight.check_textures(kw["textures"], train_kw["image_size"], endpoint)
    if len(mvtec.train_items) < 2 and kw["holdout"] > 0:
        msg = f"--holdout {kw['holdout']}: only {len(mvtec.train_items)} training image(s)"
        raise InputError(msg)
    if kw["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            msg = "--device cuda: no CUDA device is visible"
            raise InputError(msg)
    if kw["resume"]:
        preflight.check_resume(out, kw["category"])
    from realnet_train.train import TrainConfig  # torch: once every cheap check has passed

    return TrainConfig(
        category=kw["category"],
        data=kw["data"],
        out=kw["out"],
        sia=kw["sia"],
        textures=kw["textures"],
        mix=mix,
        strength_range=strengths,
        checkpoint_every=kw["checkpoint_every"],
        max_bad_samples=kw["max_bad_samples"],
        holdout=kw["holdout"],
        target_fpr=kw["target_fpr"],
        device=kw["device"],
        num_workers=kw["workers"],
        threads=kw["threads"],
        seed=kw["seed"],
        resume=kw["resume"],
        endpoint_url=endpoint,
        foreground=kw["foreground"],
        model=model,
        **train_kw,
    )


@click.command("realnet-train", cls=OneLineCommand, context_settings=CONTEXT, epilog=help_text())
@click.option("--category", required=True, help="Category folder name under --data.")
@click.option("--data", required=True, help="MVTec-layout root (folder or s3://).")
@click.option("--sia", default=None, help="SIA dataset root (format v1; folder or s3://).")
@click.option("--textures", default=None, help="Texture image folder (e.g. DTD images/).")
@click.option("--mix", default=None, help="Source probabilities, e.g. normal=0.5,sia=0.5.")
@click.option("--strengths", default=None, help="Keep SIA samples with strength in LO:HI.")
@click.option("--out", required=True, help="Run folder (created; holds last.pt, train_log.json).")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT_PRESET,
    help="Named settings (see below); the options marked (preset) default to its values.",
)
@click.option(
    "--image-size", type=Number(int, 32, 4096), default=None, help=preset_values("image_size")
)
@click.option(
    "--crop-size",
    type=Number(int, 32, 4096),
    default=None,
    help="Train on random N x N crops of the --image-size images (a composite's crop holds "
    f"part of its anomaly); evaluate on whole images. {preset_values('crop_size')}",
)
@click.option(
    "--resize",
    type=click.Choice(FITS),
    default=None,
    help="How non-square images fit the --image-size square: 'squash' resizes them to it (as "
    "the authors and PatchCore do; the short side keeps the most pixels, shapes stretch), "
    "'letterbox' keeps the aspect ratio and edge-pads the short side (fewer pixels across "
    f"it). Square images are the same either way. {preset_values('resize')}",
)
@click.option("--batch-size", type=POSITIVE_INT, default=None, help=preset_values("batch_size"))
@click.option("--steps", type=POSITIVE_INT, default=None, help=preset_values("steps"))
@click.option(
    "--time-budget",
    type=POSITIVE_FLOAT,
    default=None,
    help=f"Stop after N seconds {preset_values('time_budget_s')}",
)
@click.option("--lr", type=POSITIVE_FLOAT, default=None, help=f"Adam {preset_values('lr')}")
@click.option(
    "--lr-schedule",
    type=click.Choice(LR_SCHEDULES),
    default=None,
    help="Keep the lr, or decay it to 0 along a cosine over the steps (or the time budget, "
    f"if that runs out first). {preset_values('lr_schedule')}",
)
@click.option(
    "--afs-batches",
    type=POSITIVE_INT,
    default=None,
    help=f"Batches AFS is fitted on {preset_values('afs_batches')}",
)
@click.option("--workers", type=NON_NEGATIVE_INT, default=1, help="DataLoader worker processes.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads.")
@click.option("--seed", type=Number(int), default=0)
@click.option("--checkpoint-every", type=POSITIVE_INT, default=100)
@click.option(
    "--max-bad-samples",
    type=NON_NEGATIVE_INT,
    default=20,
    help="Unreadable or contradicting samples to skip before stopping (with a checkpoint).",
)
@click.option(
    "--holdout",
    type=Number(float, 0, 0.5),
    default=0.1,
    help="Share of train/good held out to calibrate the decision threshold.",
)
@click.option(
    "--target-fpr",
    type=PROBABILITY_OPEN,
    default=0.05,
    help="False-positive rate on held-out good images the stored threshold allows.",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cuda if any]"
)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--backbone", default=None, help=f"timm name {preset_values('backbone')}")
@click.option(
    "--backbone-weights",
    default=None,
    help="Local ImageNet weights file; required by --preset paper (nothing is downloaded).",
)
@click.option("--levels", default=None, help=f"Backbone feature levels {preset_values('levels')}")
@click.option(
    "--afs-keep", default=None, help=f"Channels AFS keeps per level {preset_values('afs_keep')}"
)
@click.option(
    "--recon-width",
    type=POSITIVE_INT,
    default=None,
    help=f"UNet base width {preset_values('recon_width', none='0.5 x kept')}",
)
@click.option(
    "--rrs-counts", default=None, help=f"RRS channels by MAX,MEAN {preset_values('rrs_counts')}"
)
@click.option(
    "--foreground",
    type=click.Choice(FOREGROUND_CHOICES),
    default=None,
    help="Where anomalies go: default the authors' rule for a known category, else auto "
    "(Otsu if the image has a plain background, else everywhere); logged and in train_log.json.",
)
@s3_endpoint_option()
@click.option("-v", "--verbose", is_flag=True)
def train_main(**kw) -> None:
    """Train RealNet on one category with SIA (and/or texture) anomalies.

    Under torchrun each rank reads its own shards; rank 0 writes OUT. Unreadable or
    contradicting samples are skipped, counted in OUT/train_log.json, and past
    --max-bad-samples the run stops with a checkpoint that --resume continues.
    """
    verbose = kw.pop("verbose")
    setup_logging(verbose)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports
    if not main_rank:
        logging.getLogger("realnet_train").setLevel(logging.WARNING)
    cfg = run_or_die(train_config, kw, verbose=verbose)
    from realnet_train.train import train

    hint = "; --resume continues from the last checkpoint"
    result = run_or_die(train, cfg, verbose=verbose, hint=hint)
    if main_rank:
        click.echo(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}))


@click.command("realnet-eval", cls=OneLineCommand, context_settings=CONTEXT)
@click.option("--checkpoint", required=True, help="A last.pt written by realnet-train.")
@click.option("--data", required=True, help="MVTec-layout root (folder or s3://).")
@click.option("--category", default=None, help="[default: the checkpoint's category]")
@click.option("--out", default=None, help="Output folder [default: CHECKPOINT's folder/eval].")
@click.option("--panels", type=NON_NEGATIVE_INT, default=8, help="PNG panels to write.")
@click.option("--batch-size", type=POSITIVE_INT, default=16)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads.")
@s3_endpoint_option()
@click.option("-v", "--verbose", is_flag=True)
def eval_main(**kw) -> None:
    """Evaluate a checkpoint: Image AUROC (overall, per defect type), Pixel AUROC, PRO, panels.

    A test split without ground_truth masks is evaluated at image level only.
    """
    setup_logging(kw["verbose"])
    from pathlib import Path

    from realnet_train import preflight

    def check() -> tuple[str, str]:
        ckpt = preflight.check_checkpoint(kw["checkpoint"])
        category = kw["category"] or ckpt["category"]
        out = kw["out"] or str(Path(kw["checkpoint"]).parent / "eval")
        preflight.check_out(out, inputs={"--data": kw["data"]})
        endpoint = kw["s3_endpoint_url"]
        items = preflight.open_category(kw["data"], category, endpoint, False).test_items
        if not any(it.label for it in items) or all(it.label for it in items):
            msg = f"--data {kw['data']}: {category}/test needs both good and defective images"
            raise InputError(msg)
        return category, out

    category, out = run_or_die(check, verbose=kw["verbose"])
    import torch

    from realnet_train.evaluate import evaluate

    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    args = (kw["checkpoint"], kw["data"], out, category, kw["panels"], kw["batch_size"])
    metrics = run_or_die(evaluate, *args, kw["s3_endpoint_url"], verbose=kw["verbose"])
    click.echo(json.dumps(metrics))


if __name__ == "__main__":
    train_main()
