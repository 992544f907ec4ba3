"""Anomaly-detection metrics on numpy arrays: Image AUROC, Pixel AUROC, PRO.

PRO follows the MVTec AD definition: for each threshold, the mean over all ground-truth
connected regions (8-connected, across all images) of the fraction of the region above
the threshold, against the false-positive rate on normal pixels; the area under that curve
up to ``fpr_limit`` (0.3), divided by ``fpr_limit``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

_EIGHT = np.ones((3, 3), dtype=int)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of image scores (N,) against labels (N,) in {0, 1}."""
    labels = np.asarray(labels).astype(int).ravel()
    if labels.min() == labels.max():
        msg = "image_auroc needs both normal and anomalous images"
        raise ValueError(msg)
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def image_auroc_per_type(
    labels: np.ndarray, defects: list[str], scores: np.ndarray
) -> dict[str, float]:
    """Image AUROC of each defect type's images against all good ones (label 0).

    Args: labels (N,) 0/1, defects (N,) each image's type, scores (N,).
    """
    kinds = sorted({d for d, y in zip(defects, labels, strict=True) if y})
    out = {}
    for kind in kinds:
        sel = np.array([y == 0 or d == kind for d, y in zip(defects, labels, strict=True)])
        out[kind] = image_auroc(labels[sel], scores[sel])
    return out


def _scored(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The (N, H, W) bool of pixels to score: ``valid``, or all of them."""
    if maps.shape != masks.shape or (valid is not None and np.shape(valid) != maps.shape):
        shapes = f"maps {maps.shape}, masks {masks.shape}" + (
            f", valid {np.shape(valid)}" if valid is not None else ""
        )
        msg = f"{shapes} differ in shape"
        raise ValueError(msg)
    return np.ones(maps.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None) -> float:
    """AUROC over pixels: maps (N, H, W) scores against masks (N, H, W) in {0, 1}.

    ``valid`` (N, H, W) bool limits it to the images' own pixels (letterbox padding out).
    """
    maps, masks = np.asarray(maps), np.asarray(masks).astype(bool)
    scored = _scored(maps, masks, valid)
    truth = masks[scored]
    if truth.all() or not truth.any():
        msg = "pixel_auroc needs both normal and anomalous pixels"
        raise ValueError(msg)
    return float(roc_auc_score(truth, maps[scored].astype(np.float64)))


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: (fprs, pros), both ascending, starting at (0, 0).

    Each pixel contributes, when the threshold passes its score, ``1 / n_normal`` to the FPR
    (normal pixel) or ``1 / (region size * n_regions)`` to the PRO (region pixel); ties are
    merged so each distinct score is one point. Pixels outside ``valid`` (letterbox padding)
    are no normal pixels: they add to neither.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    if maps.ndim != 3:
        msg = f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)"
        raise ValueError(msg)
    scored = _scored(maps, masks, valid)
    masks = masks & scored
    pro_inc = np.zeros(maps.shape, dtype=np.float64)
    regions: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=_EIGHT)
        regions.extend((i, labels == r) for r in range(1, n + 1))
    n_normal = int((~masks & scored).sum())
    if not regions or n_normal == 0:
        msg = "PRO needs at least one anomalous region and one normal pixel"
        raise ValueError(msg)
    for i, region in regions:
        pro_inc[i][region] = 1.0 / (region.sum() * len(regions))
    fp_inc = (~masks & scored).astype(np.float64) / n_normal

    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_inc.ravel()[order])
    pros = np.cumsum(pro_inc.ravel()[order])
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    fprs = np.r_[0.0, np.clip(fprs[last_of_tie], 0.0, 1.0)]
    pros = np.r_[0.0, np.clip(pros[last_of_tie], 0.0, 1.0)]
    return fprs, pros


def curve_area(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under (fprs, pros) from 0 to ``fpr_limit``, interpolating at the limit."""
    keep = fprs <= fpr_limit
    x = np.r_[fprs[keep], fpr_limit]
    y = np.r_[pros[keep], np.interp(fpr_limit, fprs, pros)]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def pro_auc(
    maps: np.ndarray,
    masks: np.ndarray,
    fpr_limit: float = 0.3,
    valid: np.ndarray | None = None,
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised to [0, 1] by ``fpr_limit``.

    Args:
        maps: (N, H, W) anomaly scores.
        masks: (N, H, W) ground truth in {0, 1}.
        fpr_limit: upper FPR bound in (0, 1].
        valid: (N, H, W) bool, the pixels to score (default: all).
    """
    if not 0.0 < fpr_limit <= 1.0:
        msg = f"fpr_limit={fpr_limit} must be in (0, 1]"
        raise ValueError(msg)
    fprs, pros = pro_curve(maps, masks, valid)
    return curve_area(fprs, pros, fpr_limit) / fpr_limit
