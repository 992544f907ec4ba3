"""Where RealNet's resolution goes on thin defects: measured on trained checkpoints.

For one category's test split and one or more ``realnet-train`` checkpoints (seeds), side
by side in one run:

- **geometry**: each defect type's thickness (twice the largest distance-transform value
  of its mask, median over the type) at the images' own size and after the checkpoint's
  resize to the training size, beside the backbone's level strides at that size: a
  defect thinner than a level's cell is averaged into that level's features;
- **image score**: Image AUROC overall and per type for the max of the k x k mean-pooled
  map (k = 16 is the model's ``score_pool``: a thin line is averaged with its surroundings)
  against smaller pools and the mean of the top q of the map's pixels;
- **evaluation size**: the same model fed the test images at the training size and larger
  (it is fully convolutional), Image AUROC (today's score), Pixel AUROC and PRO at that size;
- **positional calibration**: the map of a good image is not flat (the borders glow); the
  per-pixel mean (and spread) of the maps of up to ``--calibration-images`` training
  normals, taken from the test maps (``minus mean``) or dividing them (``z``), scored
  as today (Image AUROC per type, Pixel AUROC, PRO) at the training size;
- **edge glow**: on good images, the mean map in the outer band (1/16 of the side) over
  the interior's, and the share of good images whose largest pooled score lies in the
  band; on defective images, the share whose largest pixel lies on the (slightly
  dilated) ground truth.

Writes ``bench/results/TAG.{json,md}``. Evaluation only (no training): a few minutes
on 2 cores per checkpoint.

    nice .venv/bin/python bench/realnet_resolution.py --category magnetic_tile \\
        --checkpoints runs/a/last.pt,runs/b/last.pt --sizes 128,256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realnet_train.checkpoint import checkpoint_fit, load_model  # noqa: E402
from realnet_train.data.mvtec import MVTecCategory, MVTecItem  # noqa: E402
from realnet_train.evaluate import predict  # noqa: E402
from realnet_train.metrics import (  # noqa: E402
    image_auroc,
    image_auroc_per_type,
    pixel_auroc,
    pro_auc,
)
from realnet_train.model.realnet import image_scores  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED_DATA = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
log = logging.getLogger("realnet_resolution")

POOLS = (1, 4, 8, 16, 32)  # 32 at 256 px covers what 16 does at 128
TOP_FRACTIONS = (0.001, 0.01)
MAX_SIZE = 512
MAX_CALIBRATION = 1024


def thickness(mask: np.ndarray) -> float:
    """Twice the largest distance from a mask pixel to the background (0 for an empty mask)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return 0.0
    return 2.0 * float(cv2.distanceTransform(m, cv2.DIST_L2, 3).max())


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, H, W) -> (N,): the mean of each map's top ``fraction`` of pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def score_rules(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Image scores of (N, S, S) maps under each rule: ``pool k`` (max of the k x k mean
    pool) and ``top q`` (mean of the top q of the pixels)."""
    t = torch.from_numpy(maps)
    rules = {f"pool {k}": image_scores(t, k).numpy() for k in POOLS}
    rules |= {f"top {q:g}": top_mean(t, q).numpy() for q in TOP_FRACTIONS}
    return rules


def per_type_auroc(items: list[MVTecItem], scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of all images and of each defect type's against all good ones."""
    labels = np.array([it.label for it in items])
    per_type = image_auroc_per_type(labels, [it.defect for it in items], scores)
    return {"all": image_auroc(labels, scores), **per_type}


def edge_glow(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, pool: int
) -> dict[str, float]:
    """Border band against interior on good images; where the maximum falls on bad ones."""
    s = maps.shape[-1]
    band = max(1, s // 16)
    border = np.ones((s, s), dtype=bool)
    border[band:-band, band:-band] = False
    good = maps[labels == 0]
    ratio = float(good[:, border].mean() / max(good[:, ~border].mean(), 1e-12))
    k = min(pool, s)
    pooled = F.avg_pool2d(torch.from_numpy(good)[:, None], k, stride=1)[:, 0].numpy()
    ps = pooled.shape[-1]
    pb = max(1, band - k // 2)  # the pooled window's centre within the band
    pborder = np.ones((ps, ps), dtype=bool)
    pborder[pb:-pb, pb:-pb] = False
    at_border = float(np.mean([pborder.flat[int(p.argmax())] for p in pooled]))
    kernel = np.ones((3, 3), np.uint8)
    hits = [
        bool(cv2.dilate(m.astype(np.uint8), kernel, iterations=max(1, s // 128)).flat[a.argmax()])
        for a, m in zip(maps[labels == 1], masks[labels == 1], strict=True)
    ]
    return {
        "good_border_over_interior": ratio,
        "good_max_in_border": at_border,
        "defect_max_on_truth": float(np.mean(hits)),
    }


def calibrated(maps: np.ndarray, normal_maps: np.ndarray) -> dict[str, np.ndarray]:
    """Test maps less the normals' per-pixel mean, and as z-scores against their spread."""
    mu = normal_maps.mean(0)
    sd = normal_maps.std(0)
    eps = max(float(sd.mean()) * 0.1, 1e-8)  # a flat, noiseless pixel does not blow up
    return {"minus mean": maps - mu, "z": (maps - mu) / (sd + eps)}


def geometry(mvtec: MVTecCategory, size: int, strides: dict[str, int]) -> dict[str, Any]:
    """Median defect thickness per type at the images' own size and at ``size``."""
    rows: dict[str, Any] = {}
    for d in sorted({it.defect for it in mvtec.test_items if it.label}):
        native, fitted, sides = [], [], []
        for it in mvtec.test_items:
            if it.defect != d or it.mask is None:
                continue
            raw = mvtec.storage.get_bytes(it.mask)
            own = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            native.append(thickness(own))
            sides.append(own.shape)
            fitted.append(thickness(mvtec.mask(it, size)))
        if native:
            rows[d] = {
                "n": len(native),
                "native_hw": [
                    int(np.median([h for h, _ in sides])),
                    int(np.median([w for _, w in sides])),
                ],
                "thickness_native_px": float(np.median(native)),
                "thickness_at_size_px": float(np.median(fitted)),
                "thinner_than_level1_cell": float(np.mean(np.array(fitted) < strides["level1"])),
            }
    return {"size": size, "fit": mvtec.fit, "level_strides": strides, "types": rows}


def measure(
    ckpt_path: Path, data: str, category: str, sizes: list[int], n_calibration: int
) -> dict[str, Any]:
    """Every measurement of one checkpoint."""
    model, ckpt = load_model(ckpt_path)
    train_size = int(ckpt["image_size"])
    mvtec = MVTecCategory(data, category, None, False, checkpoint_fit(ckpt))
    items = mvtec.test_items
    labels = np.array([it.label for it in items])
    out: dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "seed": (ckpt.get("train_config") or {}).get("seed"),
        "train_size": train_size,
        "geometry": geometry(mvtec, train_size, dict(model.strides)),
        "sizes": {},
    }
    # The reconstruction UNets halve their input len(mult) - 1 times at the coarsest level.
    unit = max(model.strides.values()) * 2 ** (len(model.config.recon_channel_mult) - 1)
    for size in sizes:
        if size % unit:
            log.warning("%d px skipped: %s takes multiples of %d px", size, ckpt_path, unit)
            continue
        t0 = time.perf_counter()
        images = np.stack([mvtec.image(it, size) for it in items])
        masks = np.stack([mvtec.mask(it, size) for it in items])
        maps, scores = predict(model, images)
        rules = score_rules(maps)
        pool = model.config.score_pool
        out["sizes"][str(size)] = {
            "image_auroc": per_type_auroc(items, scores),
            "rules": {name: per_type_auroc(items, s) for name, s in rules.items()},
            "pixel_auroc": pixel_auroc(maps, masks),
            "pro": pro_auc(maps, masks, fpr_limit=0.3),
            "edges": edge_glow(maps, masks, labels, pool),
            "seconds": time.perf_counter() - t0,
        }
        if size == train_size and n_calibration:
            step = max(1, len(mvtec.train_items) // n_calibration)
            normals = mvtec.load_train(size, mvtec.train_items[::step][:n_calibration])
            normal_maps, _ = predict(model, normals)
            out["calibration"] = {"n": len(normals)}
            for name, m in calibrated(maps, normal_maps).items():
                out["calibration"][name] = {
                    "image_auroc": per_type_auroc(items, image_scores(torch.from_numpy(m), pool)),
                    "pixel_auroc": pixel_auroc(m, masks),
                    "pro": pro_auc(m, masks, fpr_limit=0.3),
                    "edges": edge_glow(m - m.min(), masks, labels, pool),
                }
        log.info(
            "%s at %d px: image AUROC %.3f (crack %.3f), PRO %.3f in %.0f s",
            ckpt_path,
            size,
            out["sizes"][str(size)]["image_auroc"]["all"],
            out["sizes"][str(size)]["image_auroc"].get("crack", float("nan")),
            out["sizes"][str(size)]["pro"],
            out["sizes"][str(size)]["seconds"],
        )
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


EDGE_KEYS = ("good_border_over_interior", "good_max_in_border", "defect_max_on_truth")


def _metric_cells(at: list[dict[str, Any]], types: list[str]) -> list[str]:
    """One table row's cells over checkpoints: Image AUROC, Pixel AUROC, PRO, per type, edges."""
    return [
        _mean_sd([a["image_auroc"]["all"] for a in at]),
        _mean_sd([a["pixel_auroc"] for a in at]),
        _mean_sd([a["pro"] for a in at]),
        *(_mean_sd([a["image_auroc"][t] for a in at]) for t in types),
        *(_mean_sd([a["edges"][k] for a in at]) for k in EDGE_KEYS),
    ]


def _metric_header(first: str, types: list[str]) -> list[str]:
    """The header and rule lines of a table of :func:`_metric_cells` rows."""
    return [
        f"| {first} | Image AUROC | Pixel AUROC | PRO | "
        + " | ".join(types)
        + " | good border/interior | good max in border | defect max on truth |",
        "|---|---|---|---|" + "---|" * len(types) + "---|---|---|",
    ]


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tables: geometry (first checkpoint), score rules and sizes (mean ± sd over runs)."""
    g = runs[0]["geometry"]
    types = list(g["types"])
    lines = [
        f"# Where RealNet's resolution goes: {meta['category']}",
        "",
        f"{len(runs)} checkpoint(s) ({', '.join(str(r['seed']) for r in runs)} seeds), trained at "
        f"{g['size']} px ({g['fit']}); evaluation only. {meta['machine']}. Mean ± sd over "
        "checkpoints.",
        "",
        f"## Geometry at {g['size']} px (level strides: "
        + ", ".join(f"{k} {v} px" for k, v in g["level_strides"].items())
        + ")",
        "",
        "| type | n | own size (h x w) | thickness, own px | thickness at "
        f"{g['size']} px | share thinner than a level-1 cell |",
        "|---|---|---|---|---|---|",
    ]
    for d, r in g["types"].items():
        lines.append(
            f"| {d} | {r['n']} | {r['native_hw'][0]} x {r['native_hw'][1]} | "
            f"{r['thickness_native_px']:.1f} | {r['thickness_at_size_px']:.1f} | "
            f"{r['thinner_than_level1_cell']:.2f} |"
        )
    train = str(g["size"])
    rules = list(runs[0]["sizes"][train]["rules"])
    lines += [
        "",
        f"## Image score rule at {train} px (pool k: max of the k x k mean-pooled map; "
        "top q: mean of the top q of the pixels)",
        "",
        "| rule | Image AUROC | " + " | ".join(types) + " |",
        "|---|---|" + "---|" * len(types),
    ]
    for rule in rules:
        vals = [[r["sizes"][train]["rules"][rule][t] for r in runs] for t in ["all", *types]]
        lines.append(f"| {rule} | " + " | ".join(_mean_sd(v) for v in vals) + " |")
    sizes = list(runs[0]["sizes"])
    lines += [
        "",
        "## Evaluation size (the model trained at "
        f"{train} px, fed larger images; today's score rule)",
        "",
        *_metric_header("size", types),
    ]
    for s in sizes:
        cells = _metric_cells([r["sizes"][s] for r in runs], types)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if "calibration" in runs[0]:
        cal = [r["calibration"] for r in runs]
        lines += [
            "",
            f"## Positional calibration at {train} px (the per-pixel mean and spread of the maps "
            f"of {cal[0]['n']} training normals; today's score rule)",
            "",
            *_metric_header("map", types),
        ]
        variants = [("as is", [r["sizes"][train] for r in runs])]
        variants += [(name, [c[name] for c in cal]) for name in cal[0] if name != "n"]
        for name, at in variants:
            lines.append(f"| {name} | " + " | ".join(_metric_cells(at, types)) + " |")
    lines += ["", f"Checkpoints: {', '.join(r['checkpoint'] for r in runs)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED_DATA / "magnetic_tile"))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--checkpoints", required=True, help="comma-separated last.pt paths")
    p.add_argument(
        "--sizes", default="128,256", help="evaluation sizes, px (multiples of the model's unit)"
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help=f"training normals for the positional calibration (0: none; <= {MAX_CALIBRATION})",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="realnet_resolution")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ckpts = [Path(c) for c in args.checkpoints.split(",") if c]
    if missing := [c for c in ckpts if not c.is_file()]:
        p.error(f"--checkpoints: no such file {missing[0]}")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: comma-separated integers expected")
    if not sizes or not all(32 <= s <= MAX_SIZE for s in sizes):
        p.error(f"--sizes: each in [32, {MAX_SIZE}]")
    if not 0 <= args.calibration_images <= MAX_CALIBRATION:
        p.error(f"--calibration-images: in [0, {MAX_CALIBRATION}]")
    if not (Path(args.data) / args.category / "test").is_dir():
        p.error(f"--data {args.data}: no {args.category}/test there")
    torch.set_num_threads(args.threads)
    runs = [measure(c, args.data, args.category, sizes, args.calibration_images) for c in ckpts]
    meta = {
        "category": args.category,
        "data": args.data,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the end",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(runs, meta))
    print(RESULTS / f"{args.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
