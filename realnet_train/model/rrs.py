"""Reconstruction Residual Selection (RRS): keep the residual channels that carry anomalies.

Squared residuals of all levels are upsampled to the finest level and stacked; per image,
the top-k channels by spatial max and the top-k by spatial mean go to the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stacked_residuals(
    feats: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Squared residuals of all levels at the finest level's size: (B, sum K_l, h1, w1)."""
    levels = list(feats)
    size = feats[levels[0]].shape[-2:]
    res = []
    for lv in levels:
        r = (feats[lv] - recons[lv]) ** 2
        if r.shape[-2:] != size:
            r = F.interpolate(r, size=size, mode="bilinear", align_corners=False)
        res.append(r)
    return torch.cat(res, 1)


def gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, C, h, w), idx (B, k) -> (B, k, h, w), per-image channel choice."""
    return torch.gather(x, 1, idx[:, :, None, None].expand(-1, -1, *x.shape[-2:]))


class RRS(nn.Module):
    """Parameter-free selection: (B, C, h, w) residuals -> (B, 2k, h, w)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        if k < 1:
            msg = f"RRS k={k} must be >= 1"
            raise ValueError(msg)
        self.k = k

    def forward(self, residuals: torch.Tensor) -> torch.Tensor:
        k = min(self.k, residuals.shape[1])
        flat = residuals.flatten(2)  # (B, C, h*w)
        by_max = flat.amax(2).topk(k, dim=1).indices
        by_mean = flat.mean(2).topk(k, dim=1).indices
        return torch.cat(
            [gather_channels(residuals, by_max), gather_channels(residuals, by_mean)], 1
        )
