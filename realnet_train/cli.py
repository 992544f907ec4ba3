"""``realnet-train`` and ``realnet-eval``: thin click wrappers around train() and evaluate()."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from realnet_train.model.backbone import DEFAULT_BACKBONE
from realnet_train.model.realnet import RealNetConfig
from sia_pipeline.compose.foreground import CHOICES as FOREGROUND_CHOICES


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"0.1:0.5"`` -> (0.1, 0.5)."""
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    try:
        out = (float(lo), float(hi if sep else lo))
    except ValueError:
        msg = f"strength range {text!r} is not LO:HI"
        raise click.BadParameter(msg) from None
    if out[0] > out[1]:
        msg = f"strength range {text!r} has LO > HI"
        raise click.BadParameter(msg)
    return out


def default_mix(sia: str | None, textures: str | None) -> str:
    """p_anomaly = 0.5, split evenly over the sources given."""
    if sia and textures:
        return "normal=0.5,sia=0.25,texture=0.25"
    if textures:
        return "normal=0.5,texture=0.5"
    return "normal=0.5,sia=0.5"


@click.command()
@click.option("--category", required=True, help="Category folder name under --data.")
@click.option("--data", required=True, help="MVTec-layout root (folder or s3://).")
@click.option("--sia", default=None, help="SIA dataset root (format v1; folder or s3://).")
@click.option("--textures", default=None, help="Texture image folder (e.g. DTD images/).")
@click.option("--mix", default=None, help="Source probabilities, e.g. normal=0.5,sia=0.5.")
@click.option("--strengths", default=None, help="Keep SIA samples with strength in LO:HI.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--image-size", default=128, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--steps", default=300, show_default=True)
@click.option("--time-budget", type=float, default=None, help="Stop after this many seconds.")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--workers", default=1, show_default=True, help="DataLoader worker processes.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=100, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@click.option("--backbone-weights", default=None, help="Local weights file for the backbone.")
@click.option("--levels", default="1,2,3,4", show_default=True, help="Backbone feature levels.")
@click.option("--afs-keep", default=0.5, show_default=True, help="Fraction of channels kept.")
@click.option("--recon-width", default=32, show_default=True)
@click.option("--rrs-k", default=16, show_default=True)
@click.option(
    "--foreground",
    type=click.Choice(FOREGROUND_CHOICES),
    default=None,
    help="Where anomalies go: default the authors' rule for a known category, else auto "
    "(Otsu if the image has a plain background, else everywhere); logged and in train_log.json.",
)
@click.option("--s3-endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL).")
@click.option("-v", "--verbose", is_flag=True)
def train_main(**kw) -> None:
    """Train RealNet on one category with SIA (and/or texture) anomalies."""
    _setup_logging(kw.pop("verbose"))
    from realnet_train.train import TrainConfig, train

    try:
        levels = tuple(int(x) for x in kw["levels"].split(","))
    except ValueError:
        msg = f"--levels {kw['levels']!r} is not a comma-separated list of integers"
        raise click.BadParameter(msg) from None
    if not kw["sia"] and not kw["textures"]:
        msg = "give an anomaly source: --sia URL and/or --textures DIR"
        raise click.UsageError(msg)
    model = RealNetConfig(
        backbone=kw["backbone"],
        backbone_weights=kw["backbone_weights"],
        levels=levels,
        afs_keep=kw["afs_keep"],
        recon_width=kw["recon_width"],
        rrs_k=kw["rrs_k"],
        head_width=kw["recon_width"],
    )
    cfg = TrainConfig(
        category=kw["category"],
        data=kw["data"],
        out=kw["out"],
        sia=kw["sia"],
        textures=kw["textures"],
        mix=kw["mix"] or default_mix(kw["sia"], kw["textures"]),
        strength_range=parse_range(kw["strengths"]),
        image_size=kw["image_size"],
        batch_size=kw["batch_size"],
        steps=kw["steps"],
        time_budget_s=kw["time_budget"],
        lr=kw["lr"],
        checkpoint_every=kw["checkpoint_every"],
        num_workers=kw["workers"],
        threads=kw["threads"],
        seed=kw["seed"],
        resume=kw["resume"],
        endpoint_url=kw["s3_endpoint_url"],
        foreground=kw["foreground"],
        model=model,
    )
    result = train(cfg)
    click.echo(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}))


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--data", required=True, help="MVTec-layout root (folder or s3://).")
@click.option("--category", default=None, help="Defaults to the checkpoint's category.")
@click.option("--out", default=None, help="Output folder (default: CHECKPOINT's folder/eval).")
@click.option("--panels", default=8, show_default=True, help="PNG panels to write.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--s3-endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL).")
@click.option("-v", "--verbose", is_flag=True)
def eval_main(**kw) -> None:
    """Evaluate a checkpoint: Image AUROC, Pixel AUROC, PRO, and anomaly-map panels."""
    _setup_logging(kw["verbose"])
    import torch

    from realnet_train.evaluate import evaluate

    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    out = kw["out"] or str(Path(kw["checkpoint"]).parent / "eval")
    metrics = evaluate(
        kw["checkpoint"],
        kw["data"],
        out,
        kw["category"],
        kw["panels"],
        kw["batch_size"],
        kw["s3_endpoint_url"],
    )
    click.echo(json.dumps(metrics))
