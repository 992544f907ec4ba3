"""Anomaly-aware Feature Selection (AFS): keep, per level, the channels that see anomalies.

Chosen once before training: for each channel, the change of its feature under synthetic
anomalies, min-max normalised per image, is compared with the (resized) anomaly mask by
MSE; the K channels with the lowest error are kept. The indices live in the checkpoint.
Kept channels are also standardised with the normal images' per-channel mean and std, so
every level weighs alike in the reconstruction loss and the residuals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_mask_errors(
    clean: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Per-channel MSE between normalised feature change and mask, summed over images.

    Args:
        clean: (N, C, h, w) features of the normal images.
        anomalous: (N, C, h, w) features of the same images with anomalies blended in.
        masks: (N, H, W) anomaly masks in [0, 1]; images with empty masks are skipped.

    Returns:
        (C,) errors summed over the images with non-empty masks (ranking needs no mean).
    """
    keep = masks.flatten(1).amax(1) > 0
    if not keep.any():
        return torch.zeros(clean.shape[1], device=clean.device)
    clean, anomalous, masks = clean[keep], anomalous[keep], masks[keep]
    diff = (anomalous - clean).abs()  # (n, C, h, w)
    lo = diff.flatten(2).amin(2)[..., None, None]
    hi = diff.flatten(2).amax(2)[..., None, None]
    norm = (diff - lo) / (hi - lo).clamp_min(1e-8)
    target = F.interpolate(masks[:, None].float(), size=diff.shape[-2:], mode="bilinear")
    return ((norm - target) ** 2).mean((2, 3)).sum(0)  # (C,)


def select_channels(errors: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted ascending) of the ``k`` channels with the lowest error."""
    if not 0 < k <= errors.numel():
        msg = f"AFS k={k} must be in 1..{errors.numel()} (the level's channel count)"
        raise ValueError(msg)
    return torch.topk(errors, k, largest=False).indices.sort().values


class AFS(nn.Module):
    """Holds the chosen channel indices per level and applies them.

    Before :meth:`fit`, the first K channels are used (a placeholder the trainer replaces).
    """

    def __init__(self, keep: dict[str, int]) -> None:
        super().__init__()
        self.levels = list(keep)
        for level, k in keep.items():
            self.register_buffer(f"idx_{level}", torch.arange(k))
            self.register_buffer(f"mean_{level}", torch.zeros(k))
            self.register_buffer(f"std_{level}", torch.ones(k))
        self.register_buffer("fitted", torch.tensor(False))

    def indices(self, level: str) -> torch.Tensor:
        return getattr(self, f"idx_{level}")

    def fit(
        self,
        errors: dict[str, torch.Tensor],
        mean: dict[str, torch.Tensor] | None = None,
        std: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Choose each level's channels from accumulated :func:`channel_mask_errors`.

        Args:
            errors: level -> (C,) errors; the K lowest are kept.
            mean, std: level -> (C,) per-channel statistics of normal features (optional).
        """
        for level in self.levels:
            k = self.indices(level).numel()
            idx = select_channels(errors[level], k)
            self.indices(level).copy_(idx)
            if mean is not None and std is not None:
                getattr(self, f"mean_{level}").copy_(mean[level][idx])
                getattr(self, f"std_{level}").copy_(std[level][idx].clamp_min(1e-6))
        self.fitted.fill_(True)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """level -> (B, C, h, w)  becomes  level -> (B, K, h, w), standardised."""
        out = {}
        for lv in self.levels:
            f = feats[lv].index_select(1, self.indices(lv))
            mean = getattr(self, f"mean_{lv}")[None, :, None, None]
            std = getattr(self, f"std_{lv}")[None, :, None, None]
            out[lv] = (f - mean) / std
        return out
