"""Per-level reconstruction: the authors' attention UNet maps features to normal ones.

Structure as RealNet's ``models/recon`` (an ADM-style UNet without time embedding): per
level a UNet with base width ``int(hide_ratio * planes)`` (the authors: 0.5), channel
multipliers (1, 2, 4), 2 residual blocks per resolution, self-attention at downsampling
factors 2 and 4 (64 channels a head), average-pool downsampling, transposed-conv
upsampling, 32-group GroupNorm, and a zero-initialised output conv. Parameter names follow
the authors' module, so their state dicts load unchanged (the equality test relies on it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

GROUPS = 32  # GroupNorm groups, as the authors' ``normalization``


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    if channels % GROUPS:
        msg = f"reconstruction width {channels} must be a multiple of {GROUPS} (GroupNorm groups)"
        raise ValueError(msg)
    return GroupNorm32(GROUPS, channels)


class Upsample(nn.Module):
    """x2 by a 4x4 stride-2 transposed convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Downsample(nn.Module):
    """/2 by 2x2 average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """norm -> SiLU -> (resample) -> 3x3 conv, plus a (1x1-projected, resampled) skip."""

    def __init__(
        self, channels: int, out_channels: int | None = None, up: bool = False, down: bool = False
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels), Upsample(channels)
        elif down:
            self.h_upd, self.x_upd = Downsample(), Downsample()
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention (``channels // head_channels`` heads), zero-initialised output."""

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        if channels % head_channels:
            msg = f"attention width {channels} is not a multiple of {head_channels} per head"
            raise ValueError(msg)
        self.num_heads = channels // head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T), laid out per head as (q, k, v)
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(-1)
        h = torch.einsum("bts,bcs->bct", weight.type(v.dtype), v).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class ReconstructionUNet(nn.Module):
    """(B, C, h, w) features -> (B, C, h, w) reconstructed normal features.

    Args:
        channels: feature channels C (AFS keep count of the level).
        width: base width (the authors: ``int(0.5 * C)``); a multiple of 32.
        channel_mult: width multiplier per resolution.
        num_res_blocks: residual blocks per resolution.
        attention_ds: downsampling factors with self-attention.
        head_channels: channels per attention head.

    h and w must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        channels: int,
        width: int,
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_ds: tuple[int, ...] = (2, 4),
        head_channels: int = 64,
    ) -> None:
        super().__init__()
        self.min_size = 2 ** (len(channel_mult) - 1)
        ch = width * channel_mult[0]
        self.input_blocks = nn.ModuleList([nn.Conv2d(channels, ch, 3, padding=1)])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, width * mult)]
                ch = width * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(ResBlock(ch, ch, down=True))
                skips.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(
            ResBlock(ch), AttentionBlock(ch, head_channels), ResBlock(ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), width * mult)]
                ch = width * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(width * channel_mult[0], channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        if x.shape[-2] % self.min_size or x.shape[-1] % self.min_size:
            msg = f"feature size {tuple(x.shape[-2:])} is not divisible by {self.min_size}"
            raise ValueError(msg)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h)
            hs.append(h)
        h = self.middle_block(h)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1))
        return self.out(h)


def feature_residual(feats: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction residual, (B, C, h, w)."""
    return (feats - recon) ** 2
