"""Evaluate a RealNet checkpoint on a category's test split: metrics JSON and PNG panels.

Masks and maps are compared at the model's input size (ground truth resized by nearest
neighbour), over the images' own pixels: a letterboxed image's padding is not scored
(``pixels_scored`` in the metrics). A test split without masks for every defective image
(labelled per image only) is evaluated at image level: Image AUROC overall and per defect
type, pixel metrics ``None`` and the panels' ground-truth column is left black. Panels
show image | ground truth | anomaly map; the colour scale runs from 0 to the largest pixel
score on the whole test split (``panel_scale_max`` in the metrics), the same for every
panel, so panels compare with each other but not across checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from realnet_train.checkpoint import checkpoint_fit, load_model
from realnet_train.data.mvtec import MVTecCategory
from realnet_train.metrics import image_auroc, image_auroc_per_type, pixel_auroc, pro_auc
from realnet_train.train import to_tensor

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 -> anomaly maps (N, S, S) float32 and image scores (N,)."""
    model.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        out = model(to_tensor(torch.from_numpy(images[i : i + batch_size])))
        maps.append(out.anomaly_map.numpy())
        scores.append(out.image_score.numpy())
    return np.concatenate(maps).astype(np.float32), np.concatenate(scores)


@torch.no_grad()
def model_ms_per_image(model: torch.nn.Module, images: np.ndarray, n: int = 16) -> float:
    """Model-only inference time at batch 1: ms per image over up to ``n`` images.

    Images are already decoded and resized; no data loading, no metrics. One warm-up pass
    first. Comparable to ``model_ms_per_image`` of ``../shared/tools/patchcore_baseline.py``.
    """
    model.eval()
    x = to_tensor(torch.from_numpy(images[: max(1, n)]))
    model(x[:1])
    t0 = time.perf_counter()
    for i in range(len(x)):
        model(x[i : i + 1])
    return (time.perf_counter() - t0) * 1000.0 / len(x)


def panel(image: np.ndarray, mask: np.ndarray, amap: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """(S, S, 3) uint8 image | ground truth | JET-coloured anomaly map (0..vmax), 4 px gaps."""
    gt = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    scaled = np.clip(amap / max(vmax, 1e-8) * 255, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, gt, gap, heat], axis=1)


def pick_panels(labels: np.ndarray, n: int) -> list[int]:
    """A fixed, spread-out sample: about 3/4 anomalous and 1/4 normal images."""
    anom, norm = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_norm = min(len(norm), max(1, n // 4))
    n_anom = min(len(anom), n - n_norm)
    chosen = {int(i) for i in spread(anom, n_anom)} | {int(i) for i in spread(norm, n_norm)}
    return sorted(chosen)


def spread(idx: np.ndarray, k: int) -> np.ndarray:
    """``k`` evenly spaced entries of ``idx``."""
    if k <= 0:
        return idx[:0]
    return idx[np.linspace(0, len(idx) - 1, k).round().astype(int)]


def evaluate(
    checkpoint: str | Path,
    data: str,
    out: str | Path,
    category: str | None = None,
    panels: int = 8,
    batch_size: int = 16,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Score every test image; write ``OUT/metrics.json`` and ``OUT/panels/*.png``."""
    t0 = time.perf_counter()
    model, ckpt = load_model(checkpoint)
    category = category or ckpt["category"]
    size = int(ckpt["image_size"])
    mvtec = MVTecCategory(data, category, endpoint_url, False, checkpoint_fit(ckpt))
    items = mvtec.test_items
    labels = np.array([it.label for it in items])
    if not items or labels.all() or not labels.any():
        msg = f"the test split of {mvtec.url} needs both good and defective images"
        raise FileNotFoundError(msg)
    loaded = [mvtec.image_and_content(it, size) for it in tqdm(items, desc="load test", unit="img")]
    images = np.stack([image for image, _ in loaded])
    valid = np.stack([content for _, content in loaded])  # letterbox padding is not scored
    masks = np.stack([mvtec.mask(it, size) for it in items])
    t_model = time.perf_counter()
    maps, scores = predict(model, images, batch_size)
    model_s = time.perf_counter() - t_model
    per_type = image_auroc_per_type(labels, [it.defect for it in items], scores)
    metrics = {
        "category": category,
        "checkpoint": str(checkpoint),
        "step": int(ckpt["step"]),
        "image_size": size,
        "n_test": len(items),
        "n_anomalous": int(labels.sum()),
        "level": "pixel" if mvtec.has_masks else "image",
        "image_auroc": image_auroc(labels, scores),
        "image_auroc_per_type": per_type,
        "pixel_auroc": pixel_auroc(maps, masks, valid) if mvtec.has_masks else None,
        "pro": pro_auc(maps, masks, fpr_limit=0.3, valid=valid) if mvtec.has_masks else None,
        "pixels_scored": int(valid.sum()),
        "panel_scale_max": float(maps.max()),
        # Model only (decoded images in memory, no metrics): the whole split at --batch-size,
        # and batch 1 as patchcore_baseline.py measures it.
        "model_ms_per_image": 1000 * model_s / len(items),
        "eval_s": time.perf_counter() - t0,
        "model_ms_per_image_batch1": model_ms_per_image(model, images),
    }
    # End to end: checkpoint load, reading and resizing, inference, metrics (not panels).
    metrics["end_to_end_ms_per_image"] = metrics["eval_s"] * 1000.0 / len(items)
    out = Path(out)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    for i in pick_panels(labels, panels):
        stem = items[i].image.rsplit(".", 1)[0].split("/", 1)[1].replace("/", "_")
        png = panel(images[i], masks[i], maps[i], metrics["panel_scale_max"])
        cv2.imwrite(str(out / "panels" / f"{stem}.png"), cv2.cvtColor(png, cv2.COLOR_RGB2BGR))
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
    log.info(
        "%s: image AUROC %.3f, pixel AUROC %s, PRO %s; model-only %.1f ms/image "
        "(%.1f at batch 1), end to end %.1f ms/image",
        category,
        metrics["image_auroc"],
        metrics["pixel_auroc"],
        metrics["pro"],
        metrics["model_ms_per_image"],
        metrics["model_ms_per_image_batch1"],
        metrics["end_to_end_ms_per_image"],
    )
    return metrics
