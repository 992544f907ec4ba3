"""Reconstruction Residual Selection (RRS): keep the residual channels that carry anomalies.

As the authors' ``models/rrs``: each level's squared residual is upsampled (bilinear,
corners aligned) to the finest level's stride and all are stacked; a BatchNorm without
affine parameters (momentum 0.9) standardises the channels for ranking only; per image,
the top-k channels by spatial max and the top-k by spatial mean of the standardised
residual are kept, and the RAW residuals of those channels go to the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("max", "mean")


def stacked_residuals(residuals: dict[str, torch.Tensor], strides: dict[str, int]) -> torch.Tensor:
    """Residuals of all levels at the finest stride: (B, sum K_l, h1, w1).

    Args:
        residuals: level -> (B, K_l, h_l, w_l) squared residuals.
        strides: level -> backbone stride of that level.
    """
    align = min(strides[lv] for lv in residuals)
    out = []
    for lv, r in residuals.items():
        factor = strides[lv] // align
        if factor != 1:
            size = (r.shape[-2] * factor, r.shape[-1] * factor)
            r = F.interpolate(r, size=size, mode="bilinear", align_corners=True)
        out.append(r)
    return torch.cat(out, 1)


def gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, C, h, w), idx (B, k) -> (B, k, h, w), per-image channel choice."""
    return torch.gather(x, 1, idx[:, :, None, None].expand(-1, -1, *x.shape[-2:]))


class RRS(nn.Module):
    """(B, C, h, w) stacked residuals -> (B, sum(counts), h, w) selected raw residuals.

    Args:
        channels: C, the stacked residual channels (sum of the AFS keep counts).
        counts: channels kept by spatial max and by spatial mean (the authors: 256, 256).
    """

    def __init__(self, channels: int, counts: tuple[int, int]) -> None:
        super().__init__()
        if len(counts) != len(MODES) or not all(0 < k <= channels for k in counts):
            msg = f"RRS counts {tuple(counts)} must be two numbers in 1..{channels}"
            raise ValueError(msg)
        self.counts = tuple(int(k) for k in counts)
        self.bn_idx = nn.BatchNorm2d(channels, momentum=0.9, affine=False)

    @property
    def out_channels(self) -> int:
        return sum(self.counts)

    def forward(self, residuals: torch.Tensor) -> torch.Tensor:
        ranked = self.bn_idx(residuals).detach().flatten(2)  # (B, C, h*w)
        chosen = []
        for mode, k in zip(MODES, self.counts, strict=True):
            score = ranked.amax(2) if mode == "max" else ranked.mean(2)
            chosen.append(gather_channels(residuals, score.topk(k, dim=1).indices))
        return torch.cat(chosen, 1)
