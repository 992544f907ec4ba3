"""The authors' 2-class (normal / anomalous) segmentation decoder on selected residuals.

As the decoder in RealNet's ``models/rrs``: a 2-layer residual stack at the input width,
3x3 convs to 128 (BatchNorm, ReLU), 32 and 8 channels, x2 bilinear upsampling, 3x3 convs to
4 and 2 channels, then bilinear (corners aligned) to the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x)))), both convs at the input width, no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self._block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, num_layers: int) -> None:
        super().__init__()
        self._layers = nn.ModuleList(Residual(channels) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class SegmentationHead(nn.Module):
    """(B, C, h, w) selected residuals -> (B, 2, H, W) logits at the image size.

    Args:
        in_channels: C, the RRS output channels.
        num_residual_layers: layers of the residual stack (the authors: 2).
    """

    def __init__(self, in_channels: int, num_residual_layers: int = 2) -> None:
        super().__init__()
        self.decoder1 = nn.Sequential(
            ResidualStack(in_channels, num_residual_layers),
            nn.Conv2d(in_channels, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU()
        )
        self.decoder3 = nn.Sequential(
            nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        y = self.decoder2(self.decoder1(x))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        y = self.decoder3(y)
        return F.interpolate(y, size=tuple(image_size), mode="bilinear", align_corners=True)
