"""AFS keeps the channels whose change follows the anomaly mask; RRS picks top residuals.

Behaviour on constructed inputs; equality with the authors' code: test_realnet_reference_modules.
"""

from __future__ import annotations

import pytest
import torch

from realnet_train.model.afs import AFS, channel_mask_errors, select_channels
from realnet_train.model.rrs import RRS, stacked_residuals
from realnet_train.train import anomaly_only_mix


def constructed_example(responsive: list[int], channels: int = 10, n: int = 6):
    """Features whose ``responsive`` channels change exactly where the mask is; others get
    changes that ignore the mask (global shifts, noise, a fixed blob elsewhere)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 32, 32)
    for i in range(n):
        y, x = 4 + 3 * i, 20 - 2 * i
        masks[i, y : y + 8, x : x + 8] = 1.0
    clean = torch.randn(n, channels, 16, 16, generator=g)
    change = torch.randn(n, channels, 16, 16, generator=g) * 0.5
    change[:, 0] += 3.0  # shifts everywhere
    change[:, 1, 0:4, 0:4] += 5.0  # a fixed spot unrelated to the mask
    small = torch.nn.functional.interpolate(masks[:, None], size=(16, 16), mode="area")[:, 0]
    for c in responsive:
        change[:, c] = small * (2.0 + c) + 0.01 * torch.randn(n, 16, 16, generator=g)
    return clean, clean + change, masks


def test_afs_keeps_channels_that_respond_to_the_mask():
    clean, anomalous, masks = constructed_example([3, 7])
    errors = channel_mask_errors(clean, anomalous, masks)
    assert errors.shape == (10,)
    assert select_channels(errors, 2).tolist() == [3, 7]
    # The responsive channels beat every other one by a clear margin.
    others = [c for c in range(10) if c not in (3, 7)]
    assert errors[[3, 7]].max() < 0.5 * errors[others].min()


def test_afs_batches_hold_anomalies_only():
    """As the authors, AFS is fitted on a mix without normal images, sources equally likely."""
    assert anomaly_only_mix("normal=0.5,sia=0.5") == "sia=1.0"
    assert anomaly_only_mix("normal=0.5,sia=0.1,texture=0.4") == "sia=0.5,texture=0.5"
    with pytest.raises(ValueError, match="AFS needs synthetic anomalies"):
        anomaly_only_mix("normal=1.0")


def test_afs_module_applies_indices():
    afs = AFS({"level1": 2})
    afs.fit({"level1": torch.tensor([5.0, 0.1, 3.0, 0.2])})
    assert afs.indices("level1").tolist() == [1, 3]
    assert bool(afs.fitted)
    feats = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    out = afs({"level1": feats})["level1"]
    assert out.shape == (1, 2, 2, 2)
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0]  # the features as they are
    # Indices are buffers, so they travel in the state dict (the checkpoint).
    assert afs.state_dict()["idx_level1"].tolist() == [1, 3]


def test_select_channels_rejects_bad_k_and_ranks_nan_last():
    with pytest.raises(ValueError, match="AFS k=5"):
        select_channels(torch.zeros(4), 5)
    errors = torch.tensor([0.3, float("nan"), 0.1, 0.2, 0.5])  # NaN counts as 0.5
    assert select_channels(errors, 3).tolist() == [0, 2, 3]


def test_rrs_picks_top_channels_by_max_and_by_mean():
    res = {"a": torch.zeros(2, 4, 4, 4), "b": torch.zeros(2, 2, 2, 2)}
    res["a"][0, 2, 0, 0] = 36.0  # one hot pixel (mean 2.25): top by max
    res["a"][0, 1] = 4.0  # uniform residual: top by mean
    stacked = stacked_residuals(res, {"a": 4, "b": 8})
    assert stacked.shape == (2, 6, 4, 4)  # level b upsampled to level a's 4x4
    out = RRS(6, (1, 1)).train()(stacked)
    assert out.shape == (2, 2, 4, 4)
    assert torch.equal(out[0, 0], stacked[0, 2])
    assert torch.equal(out[0, 1], stacked[0, 1])
