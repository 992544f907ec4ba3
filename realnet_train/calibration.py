"""Decision threshold from held-out good images at a false-positive rate the user chooses.

Training sets aside a few ``train/good`` images (never trained on), scores them at the end,
and stores the scores and the threshold for ``target_fpr`` in the checkpoint;
``realnet-predict --target-fpr`` can re-derive a threshold from the stored scores. With n
held-out images the achievable rates are multiples of 1/n.
"""

from __future__ import annotations

import math

import numpy as np


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): ``round(fraction * n)`` held out, at most ``n - 1``.

    Args:
        n: number of normal training images.
        fraction: share held out for calibration (0 holds none out).
        seed: fixes the split (a resumed run holds out the same images).
    """
    k = min(n - 1, round(fraction * n)) if fraction > 0 else 0
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(perm[: n - k]), np.sort(perm[n - k :])


def threshold_at_fpr(scores: np.ndarray | list[float], target_fpr: float) -> float:
    """Smallest threshold with at most ``target_fpr`` of ``scores`` strictly above it.

    A score ``> threshold`` is called anomalous. Args: scores (n,) of good images.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        msg = "no held-out scores to calibrate on"
        raise ValueError(msg)
    allowed = math.floor(target_fpr * s.size + 1e-9)
    return float(s[min(allowed, s.size - 1)])


def calibration_record(scores: np.ndarray, target_fpr: float, names: list[str]) -> dict:
    """What the checkpoint stores: scores, the threshold, and the rate it achieves."""
    thr = threshold_at_fpr(scores, target_fpr)
    return {
        "target_fpr": float(target_fpr),
        "threshold": thr,
        "holdout_fpr": float(np.mean(np.asarray(scores) > thr)),
        "scores": [float(x) for x in scores],
        "images": list(names),
    }
