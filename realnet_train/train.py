"""Train RealNet on one category: normal images + composites from SIA shards or textures.

Reads top to bottom like nanoGPT's ``train.py``: config, data, model (AFS chosen once on
synthetic anomalies), optimiser, loop. Checkpoints carry ``model_args`` so evaluation
rebuilds the model from the file alone; ``resume`` continues from ``OUT/last.pt``. The
trainer never looks at the test split.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from realnet_train.data.mvtec import MVTecCategory
from realnet_train.data.sia_stream import sia_pipeline
from realnet_train.data.train_stream import CompositeStream, StreamConfig, TextureSource, parse_mix
from realnet_train.model.afs import channel_mask_errors
from realnet_train.model.realnet import RealNet, RealNetConfig, realnet_losses
from sia_pipeline.compose import choose_rule

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
LOG_NAME = "train_log.json"


@dataclass
class TrainConfig:
    """Everything a run needs; saved in checkpoints and ``train_log.json``."""

    category: str
    data: str
    out: str
    sia: str | None = None
    textures: str | None = None
    mix: str = "normal=0.5,sia=0.5"
    strength_range: tuple[float, float] | None = None
    image_size: int = 128
    batch_size: int = 8
    steps: int = 300
    time_budget_s: float | None = None
    lr: float = 1e-3
    afs_batches: int = 4
    checkpoint_every: int = 100
    num_workers: int = 1
    threads: int | None = None
    seed: int = 0
    resume: bool = False
    endpoint_url: str | None = None
    foreground: str | None = None  # None: the authors' table, else auto
    model: RealNetConfig = field(default_factory=RealNetConfig)


def to_tensor(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def build_loader(cfg: TrainConfig, mvtec: MVTecCategory, seed: int) -> DataLoader:
    mix = parse_mix(cfg.mix)
    normals = mvtec.load_train(cfg.image_size)
    log.info("%s: %d normal training images at %d px", cfg.category, len(normals), cfg.image_size)
    sia = None
    if cfg.sia and mix["sia"] > 0:
        sia = sia_pipeline(
            cfg.sia,
            [cfg.category],
            cfg.strength_range,
            resampled=True,
            shuffle=64,
            seed=seed,
            endpoint_url=cfg.endpoint_url,
        )
    textures = None
    if cfg.textures and mix["texture"] > 0:
        textures = TextureSource(cfg.textures, cfg.image_size, cfg.endpoint_url)
    rule = choose_rule(cfg.category, cfg.foreground, list(normals[:8]))
    log.info("%s: foreground rule %s", cfg.category, rule.describe())
    stream = CompositeStream(
        normals,
        StreamConfig(cfg.image_size, mix, rule, seed),
        sia=sia,
        textures=textures,
    )
    return DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )


@torch.no_grad()
def fit_afs(model: RealNet, batches: list[dict[str, torch.Tensor]]) -> None:
    """Choose AFS channels from synthetic anomalies; record normal features' mean/std."""
    errors: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    count = 0
    n_anom = 0
    for batch in batches:
        clean = model.backbone(to_tensor(batch["clean"]))
        anom = model.backbone(to_tensor(batch["image"]))
        masks = batch["mask"]
        n_anom += int((masks.flatten(1).amax(1) > 0).sum())
        for lv, f in clean.items():
            errors[lv] = errors.get(lv, 0) + channel_mask_errors(f, anom[lv], masks)
            sums[lv] = sums.get(lv, 0) + f.sum((0, 2, 3))
            sq[lv] = sq.get(lv, 0) + (f**2).sum((0, 2, 3))
        count += clean[next(iter(clean))].shape[0]
    if n_anom == 0:
        msg = "AFS saw no synthetic anomaly: check the mix (it needs sia or texture > 0)"
        raise RuntimeError(msg)
    mean, std = {}, {}
    for lv, s in sums.items():
        hw = clean[lv].shape[-2] * clean[lv].shape[-1]
        n = count * hw
        mean[lv] = s / n
        std[lv] = (sq[lv] / n - mean[lv] ** 2).clamp_min(0).sqrt()
    model.afs.fit(errors, mean, std)
    log.info(
        "AFS fitted on %d anomalous images: %s",
        n_anom,
        {lv: model.afs.indices(lv).numel() for lv in model.afs.levels},
    )


def save_checkpoint(
    path: Path, model: RealNet, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig
) -> None:
    """Trainable weights, AFS indices and stats, optimiser, step, model args (atomic write)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    ckpt = {
        "model_args": model.config.to_dict(),
        "train_config": {**asdict(cfg), "model": model.config.to_dict()},
        "model": state,
        "optimizer": opt.state_dict(),
        "step": step,
        "category": cfg.category,
        "image_size": cfg.image_size,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[RealNet, dict[str, Any]]:
    """Rebuild a RealNet from a checkpoint file alone. Returns (model, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found: {path}"
        raise FileNotFoundError(msg)
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = RealNet(RealNetConfig(**ckpt["model_args"]))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
    if bad:
        msg = f"checkpoint {path} does not match its model_args: {bad[:5]}"
        raise ValueError(msg)
    return model, ckpt


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the log written to ``OUT/train_log.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt_path = out / CHECKPOINT_NAME
    history: dict[str, list[float]] = {"recon": [], "seg": []}
    if cfg.resume and ckpt_path.is_file():
        model, ckpt = load_model(ckpt_path)
        start = int(ckpt["step"])
        prev = out / LOG_NAME
        if prev.is_file():
            history = json.loads(prev.read_text())["history"]
        log.info("resuming from %s at step %d", ckpt_path, start)
    else:
        if cfg.resume:
            log.warning("--resume: no checkpoint at %s, starting fresh", ckpt_path)
        torch.manual_seed(cfg.seed)
        model, ckpt, start = RealNet(cfg.model), None, 0

    mvtec = MVTecCategory(cfg.data, cfg.category, cfg.endpoint_url)
    loader = build_loader(cfg, mvtec, seed=cfg.seed + start)
    batches = iter(loader)
    if ckpt is None:
        fit_afs(model, [next(batches) for _ in range(cfg.afs_batches)])
    opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])

    model.train()
    t0 = time.perf_counter()
    wait_s = compute_s = 0.0
    samples = 0
    step = start
    total = cfg.steps if cfg.time_budget_s is None else None  # a time budget has no step count
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.category}", unit="step", mininterval=5)
    while step < cfg.steps:
        if cfg.time_budget_s is not None and time.perf_counter() - t0 >= cfg.time_budget_s:
            log.info("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
            break
        t_wait = time.perf_counter()
        batch = next(batches)
        t_compute = time.perf_counter()
        images, clean = to_tensor(batch["image"]), to_tensor(batch["clean"])
        b = images.shape[0]
        feats = model.selected_features(torch.cat([images, clean]))  # level -> (2B, K, h, w)
        out_ = model.forward_features({lv: f[:b] for lv, f in feats.items()}, images.shape[-2:])
        losses = realnet_losses(out_, {lv: f[b:] for lv, f in feats.items()}, batch["mask"])
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        step += 1
        samples += b
        wait_s += t_compute - t_wait
        compute_s += time.perf_counter() - t_compute
        history["recon"].append(losses["recon"].item())
        history["seg"].append(losses["seg"].item())
        bar.update(1)
        bar.set_postfix(recon=f"{history['recon'][-1]:.3f}", seg=f"{history['seg'][-1]:.3f}")
        if step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, model, opt, step, cfg)
    bar.close()
    save_checkpoint(ckpt_path, model, opt, step, cfg)
    wall = time.perf_counter() - t0
    result = {
        "category": cfg.category,
        "step": step,
        "steps_this_run": step - start,
        "samples_this_run": samples,
        "wall_s": wall,
        "data_wait_s": wait_s,
        "compute_s": compute_s,
        "trainer_samples_per_s": samples / compute_s if compute_s else None,
        "checkpoint": str(ckpt_path),
        "config": {**asdict(cfg), "model": model.config.to_dict()},
        "foreground": loader.dataset.config.foreground.to_dict(),
        "history": history,
    }
    (out / LOG_NAME).write_text(json.dumps(result, indent=1))
    log.info("trained %s to step %d in %.0f s (data wait %.0f s)", cfg.category, step, wall, wait_s)
    return result
