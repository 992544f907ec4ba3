"""Named training settings: ``paper`` (the RealNet authors') and ``cpu`` (the default).

``paper`` is ``experiments/MVTec-AD/realnet.yaml`` of the authors' code: WideResNet-50
layers 1-4, AFS keeping 256/512/512/256 channels fitted on 64 batches, reconstruction UNets
of width ``0.5 * kept`` (multipliers 1, 2, 4, two residual blocks, attention at /2 and /4),
RRS 256 by max + 256 by mean, 256 px (every image resized to the square, non-square ones
squashed), Adam 1e-4, batch 16. The authors train 1000 epochs and keep the epoch with the
best TEST score; here ``steps`` stands for those epochs (13,000 steps = 1000 epochs of
bottle's 209 images at batch 16) and nothing is selected on the test split.

``cpu`` keeps that structure and scales it to 2 CPU cores and at most 20 minutes of
training: every change from ``paper`` is listed in :data:`CPU_DEPARTURES` (and in
``realnet-train --help`` and docs/realnet.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realnet_train.model.config import DEFAULT_BACKBONE, PAPER_BACKBONE, RealNetConfig

LR_SCHEDULES = ("constant", "cosine")  # see realnet_train.train.learning_rate


@dataclass(frozen=True)
class Preset:
    """Training and model settings of one preset.

    Attributes:
        name: preset name.
        train: :class:`~realnet_train.train.TrainConfig` fields (image_size, crop_size,
            batch_size, steps, lr, lr_schedule, afs_batches, time_budget_s, resize).
        model: :class:`~realnet_train.model.realnet.RealNetConfig` fields.
        needs_weights_file: the backbone's weights must come from ``--backbone-weights``.
        departures: how this preset differs from ``paper``, one line each.
    """

    name: str
    train: dict[str, Any]
    model: dict[str, Any]
    needs_weights_file: bool = False
    departures: tuple[str, ...] = field(default_factory=tuple)


PAPER = Preset(
    name="paper",
    train={
        "image_size": 256,
        "crop_size": None,
        "batch_size": 16,
        "steps": 13000,
        "lr": 1e-4,
        "lr_schedule": "constant",
        "afs_batches": 64,
        "time_budget_s": None,
        "resize": "squash",  # the authors' transforms.Resize((256, 256))
    },
    model={
        "backbone": PAPER_BACKBONE,
        "levels": (1, 2, 3, 4),
        "afs_keep": (256, 512, 512, 256),
        "recon_width": None,  # int(0.5 * kept) per level: 128, 256, 256, 128
        "recon_hide_ratio": 0.5,
        "recon_channel_mult": (1, 2, 4),
        "recon_res_blocks": 2,
        "recon_attention_ds": (2, 4),
        "rrs_counts": (256, 256),
        "head_residual_layers": 2,
        "score_pool": 16,
    },
    needs_weights_file=True,
)

CPU_DEPARTURES = (
    "backbone EfficientNet-Lite0 (packaged ImageNet weights) instead of WideResNet-50: "
    "levels 1-4 have 24/40/112/320 channels instead of 256/512/1024/2048",
    "AFS keeps 24/40/56/40 channels: the authors' keep fractions per level "
    "(all, all, half, 1/8) applied to Lite0's widths",
    "AFS fitted on 64 batches of 8 (512 anomalous images) instead of 64 of 16",
    "reconstruction UNet width 32 on every level instead of 0.5 x kept channels "
    "(12/20/28/20 would not fit the authors' 32-group GroupNorm); same shape otherwise",
    "RRS keeps 32 by max + 32 by mean of 160 stacked channels instead of 256 + 256 of 1536",
    "128 px instead of 256 px (anomaly maps and metrics at 128 px)",
    "batch 8 instead of 16; Adam lr 1e-3 instead of 1e-4 (1,500 steps instead of ~1000 epochs)",
    "training stops at 1,500 steps or 20 minutes, whichever comes first",
)

CPU = Preset(
    name="cpu",
    train={
        "image_size": 128,
        "crop_size": None,
        "batch_size": 8,
        "steps": 1500,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "afs_batches": 64,
        "time_budget_s": 1200.0,
        "resize": "squash",
    },
    model={
        **PAPER.model,
        "backbone": DEFAULT_BACKBONE,
        "afs_keep": (24, 40, 56, 40),
        "recon_width": 32,
        "rrs_counts": (32, 32),
    },
    departures=CPU_DEPARTURES,
)

PRESETS = {p.name: p for p in (CPU, PAPER)}
DEFAULT_PRESET = CPU.name


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (``ValueError`` naming the choices otherwise)."""
    if name not in PRESETS:
        msg = f"unknown preset {name!r}; choose from {', '.join(PRESETS)}"
        raise ValueError(msg)
    return PRESETS[name]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_values(field_name: str, none: str = "none") -> str:
    """``(preset) 128 / 256``: a setting's value in each preset (once if they agree), for
    the help of the option that overrides it."""
    values = [
        p.train[field_name] if field_name in p.train else p.model[field_name]
        for p in PRESETS.values()
    ]
    shown = [none if v is None else _show(v) for v in values]
    return "(preset) " + (shown[0] if len(set(shown)) == 1 else " / ".join(shown))


def help_text() -> str:
    """The presets and every departure of ``cpu`` from ``paper``, for ``--help``."""
    t, m = PAPER.train, PAPER.model
    lines = [
        f"Presets ({' / '.join(PRESETS)} in the option help below): 'paper' = the RealNet "
        f"authors' MVTec AD settings ({m['backbone']}, weights from --backbone-weights FILE, "
        f"{t['image_size']} px squares, batch {t['batch_size']}, Adam {t['lr']:g}, "
        f"AFS {'/'.join(map(str, m['afs_keep']))}, RRS {'+'.join(map(str, m['rrs_counts']))}). "
        f"'{DEFAULT_PRESET}' (default) departs from it in:",
        "",
        "\b",  # click: keep the list's line breaks
        *(f"- {d}" for d in CPU_DEPARTURES),
        "",
        "Options given explicitly override the preset.",
    ]
    return "\n".join(lines)


def resolve(
    name: str, train: dict[str, Any], model: dict[str, Any]
) -> tuple[dict[str, Any], RealNetConfig]:
    """A preset with explicit settings laid over it.

    Args:
        name: preset name.
        train: TrainConfig fields given explicitly (``None`` values mean "the preset's").
        model: RealNetConfig fields given explicitly (``None`` values mean "the preset's").

    Returns:
        (TrainConfig keyword arguments incl. ``preset``, the model config).

    Raises:
        ValueError: unknown preset, bad model settings, or a preset that needs a backbone
            weights file that was not given or does not exist.
    """
    preset = get_preset(name)
    train_kw = {**preset.train, **{k: v for k, v in train.items() if v is not None}}
    model_kw = {**preset.model, **{k: v for k, v in model.items() if v is not None}}
    if preset.needs_weights_file and model_kw["backbone"] == preset.model["backbone"]:
        weights = model_kw.get("backbone_weights")
        if not weights:
            msg = (
                f"preset {name} needs --backbone-weights FILE: {model_kw['backbone']} ImageNet "
                "weights cannot be downloaded here (e.g. torchvision's wide_resnet50_2 .pth)"
            )
            raise ValueError(msg)
        if not Path(weights).is_file():
            msg = f"--backbone-weights {weights}: no such file"
            raise ValueError(msg)
    return {**train_kw, "preset": name}, RealNetConfig(**model_kw)
