"""``realnet-predict``: score new images with a checkpoint; decisions, overlays, JSON lines, CSV.

``realnet-predict --checkpoint CKPT INPUT... --out DIR`` takes image files, folders (searched
recursively) and ``s3://`` prefixes. Each image gets a score (the model's image score: max of
the 16 x 16 mean-pooled anomaly map) and a decision ``score > threshold``. The threshold is
the one training calibrated on held-out good images at its ``--target-fpr``; ``--target-fpr``
here re-derives it from the stored held-out scores, ``--threshold`` sets it outright.

Writes, row by row as images are scored (a crash keeps what was done):

    DIR/results.jsonl    {input, score, threshold, anomalous, overlay, error}
    DIR/results.csv      the same columns
    DIR/overlays/NNNNN-<stem>.png   the image with the anomaly map over it

Images are fitted to the model's size as in training: letterboxed (aspect ratio kept,
edge-padded), or squashed when it was trained with ``--resize squash``.
Overlay: the image at its own size; the anomaly map, its padding cut off, coloured relative
to the threshold t (JET: blue at 0, green at t, red at 2 t and above) and blended in with an
opacity rising from 0 at t/2 to 0.6 at t; a white contour where the map exceeds t; a top
banner with the decision (red: anomalous, green: normal), score and threshold.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import cv2
import numpy as np
from tqdm import tqdm

from realnet_train.calibration import threshold_at_fpr
from realnet_train.cli_common import (
    CONTEXT,
    POSITIVE_INT,
    PROBABILITY_OPEN,
    InputError,
    Number,
    OneLineCommand,
    die,
    s3_endpoint_option,
    setup_logging,
)
from realnet_train.data.mvtec import IMAGE_SUFFIXES, decode_rgb
from sia_pipeline.compose.resize import content_box, fit_square
from sia_pipeline.io.storage import Storage, is_s3, iter_files, open_storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FIELDS = ("input", "score", "threshold", "anomalous", "overlay", "error")


@dataclass(frozen=True)
class ImageRef:
    storage: Storage
    name: str  # relative to storage
    url: str  # what the user sees


def _split(url: str) -> tuple[str, str]:
    base, _, name = url.rstrip("/").rpartition("/")
    return base or ".", name


def list_inputs(inputs: list[str], endpoint_url: str | None = None) -> list[ImageRef]:
    """Every image named by ``inputs`` (files, folders, ``s3://`` prefixes), in order.

    Raises:
        InputError: an input that is not an image, or a folder / prefix with no image.
    """
    refs: list[ImageRef] = []
    for url in inputs:
        is_file = url.lower().endswith(IMAGE_SUFFIXES) or (not is_s3(url) and Path(url).is_file())
        if is_file:
            if not url.lower().endswith(IMAGE_SUFFIXES):
                msg = f"INPUT {url} is not an image ({', '.join(IMAGE_SUFFIXES)})"
                raise InputError(msg)
            base, name = _split(url)
            refs.append(ImageRef(open_storage(base, endpoint_url), name, url))
            continue
        storage = open_storage(url, endpoint_url)
        try:
            names = list(iter_files(storage, "", IMAGE_SUFFIXES))
        except Exception as e:  # noqa: BLE001 - StorageError, PermissionError
            msg = f"INPUT {url}: {e}"
            raise InputError(msg) from None
        if not names:
            msg = f"INPUT {url}: no images ({', '.join(IMAGE_SUFFIXES)}) under it"
            raise InputError(msg)
        refs += [ImageRef(storage, n, f"{url.rstrip('/')}/{n}") for n in names]
    return refs


def resolve_threshold(
    ckpt: dict[str, Any], threshold: float | None, target_fpr: float | None
) -> tuple[float, str]:
    """(threshold, where it came from) from the options and the checkpoint's calibration."""
    cal = ckpt.get("calibration")
    if threshold is not None and target_fpr is not None:
        msg = "give --threshold or --target-fpr, not both"
        raise InputError(msg)
    if threshold is not None:
        return threshold, "--threshold"
    if not cal:
        msg = (
            "the checkpoint has no calibrated threshold (trained with --holdout 0, stopped "
            "early, or by an older version): pass --threshold"
        )
        raise InputError(msg)
    if target_fpr is not None:
        thr = threshold_at_fpr(cal["scores"], target_fpr)
        return thr, f"--target-fpr {target_fpr:g} on {len(cal['scores'])} held-out good images"
    return float(cal["threshold"]), (
        f"calibrated at FPR {cal['target_fpr']:g} on {len(cal['scores'])} held-out good images"
    )


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float, score: float) -> np.ndarray:
    """(H, W, 3) uint8 image, (h, w) anomaly map -> (bar + H, W, 3) uint8 overlay.

    Colour and opacity are relative to the threshold ``t``: JET from 0 (blue) through ``t``
    (green) to ``2 t`` and above (red); transparent below ``t / 2``, opacity 0.6 from ``t``.
    """
    h, w = image.shape[:2]
    m = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    v = m / max(threshold, 1e-6)
    heat = cv2.applyColorMap(np.clip(v * 127.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = 0.6 * np.clip(2 * v - 1, 0, 1)[..., None]
    out = (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)
    above = (m > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 150)))
    anomalous = score > threshold
    bar_h = max(18, round(min(h, w) / 12))
    bar = np.zeros((bar_h, w, 3), dtype=np.uint8)
    bar[:] = (200, 30, 30) if anomalous else (30, 140, 30)
    text = f"{'ANOMALOUS' if anomalous else 'normal'} {score:.3f} > {threshold:.3f}"
    if not anomalous:
        text = text.replace(">", "<=")
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = bar_h / 30
    text_w = cv2.getTextSize(text, font, scale, 1)[0][0]
    scale *= min(1.0, (w - 8) / max(text_w, 1))  # fit the banner's width
    thick = max(1, round(scale * 1.5))
    cv2.putText(
        bar, text, (4, round(bar_h * 0.7)), font, scale, (255, 255, 255), thick, cv2.LINE_AA
    )
    return np.concatenate([bar, out], axis=0)


def _no_grad(fn):
    """``torch.no_grad()`` as a decorator, importing torch only when ``fn`` runs (fast --help)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_no_grad
def predict_images(
    model: torch.nn.Module,
    refs: list[ImageRef],
    size: int,
    threshold: float,
    out: Path,
    batch_size: int = 16,
    overlays: bool = True,
    device: str = "cpu",
    fit: str = "letterbox",
) -> dict[str, Any]:
    """Score ``refs``; write results and overlays under ``out``. Returns a summary.

    Images are fitted to ``size`` as the model was trained (``fit``: letterbox or squash).
    """
    import torch

    (out / "overlays").mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    n_anom = n_err = 0
    with (
        (out / "results.jsonl").open("w") as jl,
        (out / "results.csv").open("w", newline="") as cf,
        tqdm(total=len(refs), desc="predict", unit="img", mininterval=5) as bar,
    ):
        writer = csv.DictWriter(cf, FIELDS)
        writer.writeheader()
        for start in range(0, len(refs), batch_size):
            rows, originals, inputs = [], [], []
            for i, ref in enumerate(refs[start : start + batch_size], start):
                try:
                    img = decode_rgb(ref.storage.get_bytes(ref.name))
                except Exception as e:  # noqa: BLE001 - PIL / storage errors: one row, go on
                    log.warning("cannot read %s: %s", ref.url, e)
                    rows.append({"input": ref.url, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                small = fit_square(img, size, fit)  # as training and evaluation
                rows.append({"input": ref.url, "_i": i, "_k": len(inputs)})
                originals.append(img)
                inputs.append(small)
            if inputs:
                x = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2).float().div(255)
                res = model(x.to(device))
                maps, scores = res.anomaly_map.cpu().numpy(), res.image_score.cpu().numpy()
            for row in rows:
                k = row.pop("_k", None)
                if k is None:
                    n_err += 1
                    row |= {"score": None, "threshold": threshold, "anomalous": None}
                    row["overlay"] = None
                else:
                    i = row.pop("_i")
                    score = float(scores[k])
                    row |= {"score": score, "threshold": threshold, "anomalous": score > threshold}
                    row |= {"overlay": None, "error": None}
                    n_anom += row["anomalous"]
                    if overlays:
                        stem = Path(refs[i].name).stem
                        rel = f"overlays/{i:05d}-{stem}.png"
                        top, left, h, w = content_box(*originals[k].shape[:2], size, fit)
                        amap = maps[k][top : top + h, left : left + w]  # padding cut off
                        png = overlay(originals[k], amap, threshold, score)
                        cv2.imwrite(str(out / rel), cv2.cvtColor(png, cv2.COLOR_RGB2BGR))
                        row["overlay"] = rel
                jl.write(json.dumps(row) + "\n")
                writer.writerow(row)
            jl.flush()
            cf.flush()
            bar.update(len(rows))
    return {"n_images": len(refs), "n_anomalous": n_anom, "n_errors": n_err}


@click.command("realnet-predict", cls=OneLineCommand, context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("--checkpoint", required=True, help="A last.pt written by realnet-train.")
@click.option("--out", required=True, help="Output folder (results.jsonl, results.csv, overlays/).")
@click.option("--threshold", type=Number(float), default=None, help="Decide score > THRESHOLD.")
@click.option(
    "--target-fpr",
    type=PROBABILITY_OPEN,
    default=None,
    help="Re-derive the threshold at this false-positive rate on the held-out good images.",
)
@click.option("--batch-size", type=POSITIVE_INT, default=16)
@click.option("--overlays/--no-overlays", default=True, help="Write overlay PNGs.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Torch device [default: cuda when there is one, else cpu].",
)
@s3_endpoint_option()
@click.option("-v", "--verbose", is_flag=True)
def main(inputs, checkpoint, out, threshold, target_fpr, batch_size, overlays, threads,
         device, s3_endpoint_url, verbose) -> None:  # fmt: skip
    """Score images (files, folders, s3:// prefixes) with a RealNet checkpoint.

    The decision is score > threshold; the threshold is the one calibrated in training on
    held-out good images unless --threshold or --target-fpr says otherwise.
    """
    setup_logging(verbose)
    from realnet_train import preflight

    try:
        preflight.check_inputs_exist(list(inputs), s3_endpoint_url)
        # Not into an INPUT folder (the next run would score its own overlays), nor over one.
        sources = {f"INPUT {i + 1}": url for i, url in enumerate(inputs)}
        out_dir = preflight.check_out(out, inputs=sources)
        ckpt = preflight.check_checkpoint(checkpoint)  # imports torch once the paths are sound
        import torch

        from realnet_train.checkpoint import checkpoint_fit, load_model

        thr, source = resolve_threshold(ckpt, threshold, target_fpr)
        refs = list_inputs(list(inputs), s3_endpoint_url)
        if device == "cuda" and not torch.cuda.is_available():
            msg = "--device cuda: no CUDA device is visible"
            raise InputError(msg)
    except InputError as e:
        die(e)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    log.info("%d images; threshold %.4f (%s)", len(refs), thr, source)
    try:
        model, ckpt = load_model(checkpoint)
        size = int(ckpt["image_size"])
        fit = checkpoint_fit(ckpt)
        summary = predict_images(model, refs, size, thr, out_dir, batch_size, overlays, device, fit)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line
        if verbose:
            raise
        die(f"{type(e).__name__}: {e} (rerun with -v for the traceback)", 1)
    summary |= {"threshold": thr, "threshold_source": source, "out": str(out_dir)}
    click.echo(json.dumps(summary))
    if summary["n_errors"] == summary["n_images"]:
        die("no image could be read (see results.jsonl)", 1)


if __name__ == "__main__":
    main()
