"""Train the class-conditional SDAS diffusion model on normal images.

Epsilon-prediction DDPM training (T = 1000, linear betas) with EMA weights, periodic
checkpoints that ``resume`` continues from, and a diffusers-format model folder with a
model card at the end. Reads top to bottom: config, data, model, loop, save.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sia_pipeline.diffusion.images import load_normal_images
from sia_pipeline.diffusion.losses import vlb_term
from sia_pipeline.diffusion.model import PRESETS, build_scheduler, build_unet, save_model

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    data: list[str]
    categories: list[str]
    out: str
    preset: str = "tiny-cpu"
    resolution: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    checkpoint_every: int | None = None
    ema_decay: float = 0.999
    hflip: bool = False
    learn_sigma: bool = False
    seed: int = 0
    resume: bool = False
    half: bool = False
    device: str = "auto"
    threads: int | None = None
    endpoint_url: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            msg = f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}"
            raise ValueError(msg)
        p = PRESETS[self.preset]
        self.resolution = self.resolution or p.resolution
        self.steps = self.steps if self.steps is not None else p.train_steps
        self.batch_size = self.batch_size or p.batch_size
        self.learning_rate = self.learning_rate or p.learning_rate
        self.checkpoint_every = self.checkpoint_every or p.checkpoint_every
        if not self.categories:
            msg = "give at least one category"
            raise ValueError(msg)
        if self.resolution % 2 ** (len(p.block_out_channels) - 1):
            msg = f"resolution {self.resolution} must be divisible by the UNet's downsampling"
            raise ValueError(msg)
        if self.steps < 1 or self.batch_size < 1:
            msg = f"steps ({self.steps}) and batch size ({self.batch_size}) must be >= 1"
            raise ValueError(msg)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        (out / CHECKPOINT_DIR).glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1])
    )
    return found[-1] if found else None


def _save_checkpoint(out: Path, step: int, state: dict) -> None:
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-checkpoint-{step}.pt"
    torch.save(state, tmp)
    os.replace(tmp, folder / f"checkpoint-{step}.pt")
    for old in sorted(folder.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
        old.unlink()  # keep the last two


def train(cfg: TrainConfig) -> str:
    """Train and write the model folder to ``cfg.out``; returns its ``model_id``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    out = Path(cfg.out)
    preset = PRESETS[cfg.preset]
    data = load_normal_images(cfg.data, cfg.categories, cfg.resolution, cfg.endpoint_url)
    log.info(
        "training on %d images of %s at %d px, %s",
        len(data.images),
        cfg.categories,
        cfg.resolution,
        device,
    )

    torch.manual_seed(cfg.seed)
    unet = build_unet(preset, len(data.categories), cfg.resolution, cfg.learn_sigma).to(device)
    scheduler = build_scheduler(cfg.learn_sigma)
    vlb_scale = scheduler.config.num_train_timesteps / 1000.0
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    step, elapsed = 0, 0.0

    ckpt = _latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint under %s, starting from scratch", out)
    if ckpt is not None:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["data_fingerprint"] != data.fingerprint:
            msg = f"{ckpt} was trained on different data (fingerprint mismatch); not resuming"
            raise ValueError(msg)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, elapsed = state["step"], state["elapsed_s"]
        log.info("resumed from %s at step %d", ckpt, step)

    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)  # (N, 3, R, R) uint8
    labels = torch.from_numpy(data.labels)
    by_class = [np.flatnonzero(data.labels == c) for c in range(len(data.categories))]
    alphas = scheduler.alphas_cumprod.to(device)
    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        # class-balanced batches: a category uniformly, then one of its images
        cats = rng.integers(0, len(by_class), cfg.batch_size)
        idx = torch.from_numpy(np.array([rng.choice(by_class[c]) for c in cats]))
        x0 = images[idx].to(device).float() / 127.5 - 1  # (B, 3, R, R) in [-1, 1]
        if cfg.hflip:
            flip = torch.from_numpy(rng.random(cfg.batch_size) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), as scheduler.add_noise
        pred = unet(xt, t, class_labels=labels[idx].to(device)).sample
        if cfg.learn_sigma:  # L_hybrid = L_simple + L_vlb (improved DDPM)
            eps_pred, var_pred = pred.split(3, dim=1)
            vlb = vlb_term(alphas, x0, xt, t, eps_pred, var_pred).mean()
            loss = F.mse_loss(eps_pred, noise) + vlb_scale * vlb
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(
                out,
                step,
                {
                    "step": step,
                    "elapsed_s": time.perf_counter() - t0,
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "data_fingerprint": data.fingerprint,
                    "config": asdict(cfg),
                },
            )
    bar.close()
    wall = time.perf_counter() - t0

    ema.copy_to(unet.parameters())
    unet.eval()
    card = {
        "categories": data.categories,
        "resolution": cfg.resolution,
        "preset": cfg.preset,
        "train_steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "ema_decay": cfg.ema_decay,
        "num_images": int(len(data.images)),
        "skipped_images": data.skipped,
        "data": cfg.data,
        "data_fingerprint": data.fingerprint,
        "train_wall_s": round(wall, 1),
        "device": str(device),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "prediction_type": "epsilon",
        "variance_type": scheduler.config.variance_type,
    }
    model_id = save_model(out, unet.cpu(), scheduler, card, half=cfg.half)
    log.info("saved %s (%s) after %d steps in %.0f s", out, model_id, step, wall)
    return model_id
