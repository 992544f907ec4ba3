"""Metrics against scikit-learn's AUROC, hand-computed PRO cases and a slow PRO reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from realnet_train.metrics import image_auroc, pixel_auroc, pro_auc


def mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as P(score_anomalous > score_normal) + 0.5 P(tie), by brute force."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def slow_pro_auc(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Reference: threshold at every distinct score, per-region overlaps, trapezoid to limit."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above[i] & reg).sum() / reg.sum() for i, reg in regions])
        points.append((fpr, pro))
    fprs, pros = map(np.array, zip(*points, strict=True))
    keep = fprs <= fpr_limit
    x = np.r_[fprs[keep], fpr_limit]
    y = np.r_[pros[keep], np.interp(fpr_limit, fprs, pros)]
    return float(np.trapezoid(y, x) / fpr_limit)


def test_image_auroc_matches_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels * 0.8
    scores[:20] = np.round(scores[:20], 1)  # some ties
    ours = image_auroc(labels, scores)
    assert ours == pytest.approx(roc_auc_score(labels, scores))
    assert ours == pytest.approx(mann_whitney_auc(labels, scores))
    assert 0.6 < ours < 0.9


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 16, 16)) > 0.8
    maps = rng.random((3, 16, 16)) + masks * 0.5
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_auroc_rejects_single_class():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))


def test_pro_two_regions_of_different_sizes_by_hand():
    # Row of 10 pixels: region A = pixels 0-1 (size 2), region B = pixels 5-8 (size 4),
    # normal pixels 2, 3, 4, 9. Thresholds, from high to low:
    #   0.90: A fully found, B none          -> PRO (1 + 0)/2 = 0.5,   FPR 0
    #   0.85: one of 4 normal pixels fires   -> PRO 0.5,               FPR 0.25
    #   0.80: half of B                       -> PRO (1 + 0.5)/2 = .75, FPR 0.25
    #   0.20: all of B                        -> PRO 1,                 FPR 0.25
    #   0.10: every normal pixel              -> FPR 1
    # Area to FPR 0.3: 0.25 * 0.5 + 0.05 * 1.0 = 0.175, normalised: 0.175 / 0.3 = 7/12.
    # (Pooling pixels instead would weigh B twice as much as A.)
    maps = np.array([[[0.9, 0.9, 0.85, 0.1, 0.1, 0.8, 0.8, 0.2, 0.2, 0.1]]])
    masks = np.array([[[1, 1, 0, 0, 0, 1, 1, 1, 1, 0]]])
    assert pro_auc(maps, masks, fpr_limit=0.3) == pytest.approx(7 / 12)
    # To FPR 1: 0.25 * 0.5 + 0.75 * 1.0 = 0.875.
    assert pro_auc(maps, masks, fpr_limit=1.0) == pytest.approx(0.875)


def test_pro_regions_in_two_images_and_perfect_map():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True  # 4 px
    masks[1, 2:7, 2:7] = True  # 25 px
    assert pro_auc(masks.astype(float), masks) == pytest.approx(1.0)
    assert pro_auc(1.0 - masks.astype(float), masks) == pytest.approx(0.0)
    # Small region found at FPR 0, big one never: PRO is 0.5 at every FPR < 1.
    maps = np.zeros((2, 8, 8))
    maps[0][masks[0]] = 1.0
    maps[1][~masks[1]] = 0.5
    assert pro_auc(maps, masks, fpr_limit=0.3) == pytest.approx(0.5)


def test_pro_matches_slow_reference_on_random_maps():
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 12, 12), dtype=bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:11, 7:9] = True
    masks[2, 0:6, 6:12] = True
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)  # rounding makes ties
    for limit in (0.05, 0.3, 1.0):
        assert pro_auc(maps, masks, limit) == pytest.approx(slow_pro_auc(maps, masks, limit))


def test_pro_rejects_bad_input():
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(np.zeros((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0)
    with pytest.raises(ValueError, match="anomalous region"):
        pro_auc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="must both be"):
        pro_auc(np.zeros((2, 2)), np.zeros((2, 2)))


def test_letterbox_padding_is_not_scored():
    """``valid`` leaves the padding out: the same figures as on the content band alone, and a
    map glowing on the padding no longer counts as false positives."""
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 4:6, 2:5] = True
    masks[1, 5:8, 8:11] = True
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)
    maps[:, :3], maps[:, 9:] = 5.0, 5.0  # edge glow on the padding rows
    valid = np.zeros(masks.shape, dtype=bool)
    valid[:, 3:9] = True  # a 2:1 image letterboxed into rows 3-8
    band = np.s_[:, 3:9]
    assert pixel_auroc(maps, masks, valid) == pixel_auroc(maps[band], masks[band])
    for limit in (0.05, 0.3):
        on_band = slow_pro_auc(maps[band], masks[band], limit)
        assert pro_auc(maps, masks, limit, valid) == pytest.approx(on_band)
        assert pro_auc(maps, masks, limit) < on_band  # the glow, scored, costs PRO
    assert pixel_auroc(maps, masks) < pixel_auroc(maps, masks, valid)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(maps, masks, valid[:, :6])


def test_image_auroc_per_type_scores_each_type_against_all_good_images():
    from realnet_train.metrics import image_auroc_per_type

    labels = np.array([0, 0, 1, 1, 1])
    defects = ["good", "good", "crack", "crack", "break"]
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.2])
    per_type = image_auroc_per_type(labels, defects, scores)
    assert list(per_type) == ["break", "crack"]  # sorted, good is not a type
    assert per_type["crack"] == pytest.approx(0.75)  # 0.9 beats both, 0.3 beats 0.1 only
    assert per_type["break"] == pytest.approx(0.5)
