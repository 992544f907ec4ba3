"""Anomaly-aware Feature Selection (AFS): keep, per level, the channels that see anomalies.

Chosen once before training, as the authors' ``models/afs``: over many batches of
synthetic anomalies (no normal images), each channel's squared feature change
``(anomalous - clean) ** 2`` is min-max normalised over the whole batch (all images and
pixels together), compared with the nearest-neighbour-resized mask by MSE, and the error is
summed over batches; the K channels with the lowest error are kept (indices sorted). The
indices are buffers, so they travel in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_mask_errors(
    clean: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """One batch's per-channel error between normalised feature change and mask.

    Args:
        clean: (B, C, h, w) features of the normal images.
        anomalous: (B, C, h, w) features of the same images with anomalies blended in.
        masks: (B, H, W) or (B, 1, H, W) anomaly masks in {0, 1}.

    Returns:
        (C,) mean squared error per channel over the batch's pixels (NaN-free: a channel
        that never changes gets the error of an all-zero prediction).
    """
    change = (anomalous - clean) ** 2
    b, c, h, w = change.shape
    flat = change.permute(1, 0, 2, 3).reshape(c, b * h * w)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    norm = (flat - lo) / (hi - lo + 1e-4)
    masks = masks.reshape(b, 1, *masks.shape[-2:]).float()
    label = F.interpolate(masks, size=(h, w), mode="nearest").permute(1, 0, 2, 3).reshape(1, -1)
    return ((norm - label) ** 2).mean(1)


def select_channels(errors: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted ascending) of the ``k`` channels with the lowest summed error.

    NaN errors (possible only from non-finite features) count as the worst finite error.
    """
    if not 0 < k <= errors.numel():
        msg = f"AFS k={k} must be in 1..{errors.numel()} (the level's channel count)"
        raise ValueError(msg)
    errors = errors.clone()
    nan = torch.isnan(errors)
    if nan.any():
        errors[nan] = errors[~nan].max() if (~nan).any() else 0.0
    return torch.topk(errors, k, largest=False).indices.sort().values


class AFS(nn.Module):
    """Holds the chosen channel indices per level and applies them.

    Args:
        keep: level name -> number of channels kept (the authors' ``planes``).

    Before :meth:`fit`, the first K channels are used (a placeholder the trainer replaces).
    """

    def __init__(self, keep: dict[str, int]) -> None:
        super().__init__()
        self.levels = list(keep)
        for level, k in keep.items():
            self.register_buffer(f"idx_{level}", torch.arange(k))
        self.register_buffer("fitted", torch.tensor(False))

    def indices(self, level: str) -> torch.Tensor:
        """(K,) kept channel indices of ``level``, ascending."""
        return getattr(self, f"idx_{level}")

    def fit(self, errors: dict[str, torch.Tensor]) -> None:
        """Choose each level's channels from summed :func:`channel_mask_errors`.

        Args:
            errors: level -> (C,) errors summed over batches; the K lowest are kept.
        """
        for level in self.levels:
            self.indices(level).copy_(select_channels(errors[level], self.indices(level).numel()))
        self.fitted.fill_(True)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """level -> (B, C, h, w)  becomes  level -> (B, K, h, w)."""
        return {lv: feats[lv].index_select(1, self.indices(lv)) for lv in self.levels}
