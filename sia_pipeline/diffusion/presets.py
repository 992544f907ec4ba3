"""SDAS model presets: UNet shape and training defaults, by name (no torch: ``--help`` lists
them without loading it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sia_pipeline.diffusion.adm import MVTEC_UNET, unet_config

DEFAULT_PRESET = "small-cpu"


@dataclass(frozen=True)
class Preset:
    """UNet shape and training defaults: ``small-cpu`` (the bundled model), ``tiny-cpu`` for
    minutes on a laptop, ``paper-gpu`` the authors' 256 px ADM."""

    resolution: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    batch_size: int
    train_steps: int
    learning_rate: float
    checkpoint_every: int
    # Further UNet2DModel options (paper-gpu: those that make it the authors' ADM exactly).
    unet_options: tuple[tuple[str, Any], ...] = ()
    learn_sigma: bool = False
    ema_decay: float = 0.999
    grad_accumulation: int = 1


_ADM = unet_config(MVTEC_UNET, num_classes=1)
_ADM_OPTIONS = (
    "attention_head_dim",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "downsample_type",
    "upsample_type",
    "flip_sin_to_cos",
    "freq_shift",
)

PRESETS: dict[str, Preset] = {
    # For tests: well under 1M parameters, 32 px.
    "test": Preset(
        32,
        (16, 32),
        ("DownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "UpBlock2D"),
        1,
        8,
        8,
        20,
        2e-4,
        10,
    ),
    # The bundled demo model: trains in minutes on 2 CPU cores.
    "tiny-cpu": Preset(
        32,
        (32, 64, 96),
        ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        1,
        16,
        32,
        4000,
        5e-4,
        500,
    ),
    # A CPU model at a useful size: 128 px (the smallest size whose real images, down- and
    # up-scaled, still sit near the originals in Lite0 feature space: KID x1000 on bottle 192
    # at 128 px, 535 at 64 px, 996 at 32 px), cheap at full resolution (16 channels, 5 levels
    # down to 8 px, attention at 16 px), learned variance so 20 sampling steps suffice. 4.3M
    # parameters (8.5 MB in fp16), about 1.5 s per step of 16 on 2 CPU cores.
    "small-cpu": Preset(
        128,
        (16, 32, 64, 128, 128),
        ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        1,
        8,
        16,
        7200,  # 2 h 56 min at the 1.47 s a step measured on the idle 2-core machine
        2e-4,
        200,
        learn_sigma=True,
    ),
    # The authors' SDAS model (their ADM UNet, 256 px, 553M parameters) and their training
    # settings (Adam 1e-4, EMA 0.9999, batch 5 per GPU, gradient accumulation 3): converted,
    # fine-tuned and from-scratch models are interchangeable. GPUs, days.
    "paper-gpu": Preset(
        256,
        _ADM["block_out_channels"],
        _ADM["down_block_types"],
        _ADM["up_block_types"],
        _ADM["layers_per_block"],
        32,
        5,
        200_000,
        1e-4,
        5_000,
        unet_options=tuple((k, _ADM[k]) for k in _ADM_OPTIONS),
        learn_sigma=True,
        ema_decay=0.9999,
        grad_accumulation=3,
    ),
}
