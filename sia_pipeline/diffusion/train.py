"""Train the class-conditional SDAS diffusion model on normal images, on one device or many.

Epsilon-prediction DDPM training (T = 1000, linear betas) with EMA weights, gradient clipping
and accumulation, periodic checkpoints that ``resume`` continues from, and a diffusers-format
model folder with a model card at the end. ``init_from`` starts from another model folder
(a converted ADM checkpoint: the authors fine-tuned OpenAI's ImageNet model), keeping the class
embeddings of categories it knows by name and re-initialising the others.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs DDP, one process per GPU (gloo on CPU): every
rank draws the same class-balanced global batch from the same seed and trains on its slice, so
N processes with batch B equal one process with batch N*B; each sample's noise comes from its
own generator (seeded by the run's seed, the micro-batch and the sample's place in the global
batch), so a rank draws only its slice. Rank 0 keeps the EMA, writes checkpoints and the
model. ``precision="bf16"`` runs the UNet under bf16 autocast (weights, optimizer and losses
stay float32). The loss is read on the host only every ``LOG_EVERY_STEPS`` steps. Reads top to
bottom: config, set-up, model, loop, save.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sia_pipeline.diffusion.images import load_normal_images
from sia_pipeline.diffusion.losses import vlb_term
from sia_pipeline.diffusion.model import (
    PRESETS,
    build_scheduler,
    build_unet,
    load_model,
    save_model,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOG_EVERY_S = 60.0  # progress lines when stderr is not a terminal
LOG_EVERY_STEPS = 50  # the loss is read on the host (a GPU sync) this often
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
MAX_NONFINITE_IN_A_ROW = 20  # skipped updates (inf/NaN gradients) before training stops


@dataclass
class TrainConfig:
    """Training options; ``None`` means the preset's value (or the ``init_from`` model's)."""

    data: list[str]
    categories: list[str]
    out: str
    preset: str = "small-cpu"
    resolution: int | None = None
    steps: int | None = None
    batch_size: int | None = None  # per process (per GPU)
    learning_rate: float | None = None
    checkpoint_every: int | None = None
    ema_decay: float | None = None
    grad_accumulation: int | None = None
    grad_clip: float = 1.0
    hflip: bool = False
    learn_sigma: bool | None = None
    init_from: str | None = None
    seed: int = 0
    resume: bool = False
    half: bool = False
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    endpoint_url: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            msg = f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}"
            raise ValueError(msg)
        p = PRESETS[self.preset]
        if not self.init_from:  # else both come from the model we start from
            self.resolution = self.resolution or p.resolution
            self.learn_sigma = p.learn_sigma if self.learn_sigma is None else self.learn_sigma
        self.steps = self.steps if self.steps is not None else p.train_steps
        for name in ("batch_size", "learning_rate", "checkpoint_every", "ema_decay"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(p, name))
        if self.grad_accumulation is None:
            self.grad_accumulation = p.grad_accumulation
        if self.precision not in PRECISIONS:
            msg = f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            raise ValueError(msg)
        if not self.categories:
            msg = "give at least one category"
            raise ValueError(msg)
        if len(set(self.categories)) != len(self.categories):
            msg = f"duplicate categories in {self.categories}"
            raise ValueError(msg)
        if self.resolution and self.resolution % 2 ** (len(p.block_out_channels) - 1):
            msg = f"resolution {self.resolution} must be divisible by the UNet's downsampling"
            raise ValueError(msg)
        counts = (self.steps, self.batch_size, self.grad_accumulation, self.checkpoint_every)
        if min(counts) < 1 or not self.learning_rate > 0:
            msg = (
                f"steps ({self.steps}), batch size ({self.batch_size}), gradient accumulation "
                f"({self.grad_accumulation}) and checkpoint interval ({self.checkpoint_every}) "
                f"must be >= 1 and the learning rate > 0"
            )
            raise ValueError(msg)
        if not 0 <= self.ema_decay < 1 or not self.grad_clip > 0:
            msg = (
                f"need 0 <= ema decay < 1 and grad clip > 0, got {self.ema_decay}, {self.grad_clip}"
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(name: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = (name == "auto" or name.startswith("cuda")) and torch.cuda.is_available()
    if world == 1:
        return Ranks(), torch.device(
            "cuda" if name == "auto" and cuda else name.replace("auto", "cpu")
        )
    local = int(os.environ["LOCAL_RANK"])  # one process per GPU: cuda:N becomes cuda:LOCAL_RANK
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("SIA_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Ranks(dist.get_rank(), dist.get_world_size()), device


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


def init_unet_from(
    url: str, categories: dict[str, int], endpoint_url: str | None = None, seed: int = 0
) -> tuple[UNet2DModel, dict[str, Any]]:
    """A UNet for ``categories`` with the weights of the model folder at ``url``.

    Class embeddings are copied by category name; categories the source does not know get a
    fresh embedding (torch's default N(0, 1), as when the authors went from ImageNet's 1000
    classes to 15).

    Returns:
        (unet, provenance): the provenance names the source and which categories were mapped.
    """
    src = load_model(url, endpoint_url=endpoint_url)
    config = {k: v for k, v in src.unet.config.items() if not k.startswith("_")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DModel.from_config({**config, "num_class_embeds": len(categories)})
    state = src.unet.state_dict()
    emb = unet.class_embedding.weight.detach().clone()  # (num_classes, time_embed_dim)
    mapped = {c: i for c, i in categories.items() if c in src.categories}
    for c, i in mapped.items():
        emb[i] = state["class_embedding.weight"][src.categories[c]]
    state["class_embedding.weight"] = emb
    unet.load_state_dict(state, strict=True)
    fresh = sorted(set(categories) - set(mapped))
    log.info("init from %s: class embeddings kept for %s, new for %s", url, sorted(mapped), fresh)
    provenance = {
        "model_id": src.model_id,
        "path": str(url),
        "categories_mapped": sorted(mapped),
        "categories_reinitialised": fresh,
        "architecture": src.card.get("architecture"),
        "resolution": src.resolution,
    }
    return unet, provenance


def _draw(rng: np.random.Generator, gen: torch.Generator, by_class: list, n: int, cfg, steps: int):
    """One global micro-batch (alike on all ranks): class-balanced image indices, flips, crop
    offsets in [0, 1) and t (n,)."""
    cats = rng.integers(0, len(by_class), n)  # a category uniformly, then one of its images
    idx = np.array([rng.choice(by_class[c]) for c in cats])
    flip = rng.random(n) < 0.5 if cfg.hflip else np.zeros(n, bool)
    offset = rng.random(n)
    t = torch.randint(0, steps, (n,), generator=gen)
    return idx, flip, offset, t


def _noise(seed: int, micro: int, rows: range, resolution: int) -> torch.Tensor:
    """The noise (len(rows), 3, R, R) of global-batch rows ``rows`` of micro-batch ``micro``:
    one generator per sample, so a rank draws its slice alone and the values do not
    depend on how the global batch is split."""
    out = torch.empty((len(rows), 3, resolution, resolution))
    for i, j in enumerate(rows):
        key = np.random.SeedSequence([seed, micro, j]).generate_state(1, np.uint64)[0]
        out[i].normal_(generator=torch.Generator().manual_seed(int(key)))
    return out


def train(cfg: TrainConfig) -> str:
    """Train and write the model folder to ``cfg.out``; returns its ``model_id`` (rank 0; other
    ranks return "")."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    had_group = dist.is_available() and dist.is_initialized()
    ranks, device = _setup(cfg.device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    provenance = None
    cats = {c: i for i, c in enumerate(cfg.categories)}
    if cfg.init_from:  # checked before the (slow) image loading
        unet, provenance = init_unet_from(cfg.init_from, cats, cfg.endpoint_url, cfg.seed)
        sigma = unet.config.out_channels == 6
        if cfg.learn_sigma is not None and cfg.learn_sigma != sigma:
            kind = "learned" if sigma else "fixed"
            msg = f"--init-from model has {kind} sigma; drop --learn-sigma/--fixed-sigma"
            raise ValueError(msg)
        if cfg.resolution and cfg.resolution != provenance["resolution"]:
            res = provenance["resolution"]
            msg = f"--init-from model is {res} px; --resolution {cfg.resolution} differs"
            raise ValueError(msg)
        cfg.learn_sigma, cfg.resolution = sigma, provenance["resolution"]
    else:
        unet = build_unet(PRESETS[cfg.preset], len(cats), cfg.resolution, cfg.learn_sigma)
    data = load_normal_images(cfg.data, cfg.categories, cfg.resolution, cfg.endpoint_url)
    log.info(
        "training on %d images of %s at %d px, %s, rank %d of %d, %d per process x %d accumulated",
        len(data.images), cfg.categories, cfg.resolution, device, ranks.rank, ranks.world,
        cfg.batch_size, cfg.grad_accumulation,
    )  # fmt: skip

    unet = unet.to(device)
    model = unet
    if ranks.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=ids)
    scheduler = build_scheduler(cfg.learn_sigma)
    num_t = scheduler.config.num_train_timesteps
    vlb_scale = num_t / 1000.0
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay) if ranks.main else None
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=0.0)  # = Adam
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, nonfinite, bad_run = 0, 0.0, 0, 0

    ckpt = _latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint under %s, starting from scratch", out)
    if ckpt is not None:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["data_fingerprint"] != data.fingerprint:
            msg = f"{ckpt} was trained on different data (fingerprint mismatch); not resuming"
            raise ValueError(msg)
        unet.load_state_dict(state["unet"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        gen.set_state(state["torch_gen"].cpu())
        step, elapsed = state["step"], state["elapsed_s"]
        nonfinite = state.get("skipped_nonfinite", 0)
        log.info("resumed from %s at step %d", ckpt, step)

    labels = torch.from_numpy(data.labels)
    by_class = [np.flatnonzero(data.labels == c) for c in range(len(data.categories))]
    alphas = scheduler.alphas_cumprod.to(device)
    n_global = cfg.batch_size * ranks.world
    mine = slice(ranks.rank * cfg.batch_size, (ranks.rank + 1) * cfg.batch_size)
    model.train()
    # A bar on a terminal; in a log file (a background run) one line a minute instead of
    # megabytes of carriage returns.
    tty = sys.stderr.isatty()
    show_bar = ranks.main and tty
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not show_bar)
    run_t0 = time.perf_counter()  # this process's start; t0 also counts earlier runs
    t0 = run_t0 - elapsed
    last_log, first_step = run_t0, step
    autocast = PRECISIONS[cfg.precision]
    loss_sum, loss_n = torch.zeros((), device=device), 0  # read every LOG_EVERY_STEPS steps
    mean_loss = float("nan")
    while step < cfg.steps:
        for micro in range(cfg.grad_accumulation):
            drawn = _draw(rng, gen, by_class, n_global, cfg, num_t)
            idx, flip, offset, t = (v[mine] for v in drawn)
            rows = range(mine.start, mine.stop)
            noise = _noise(cfg.seed, step * cfg.grad_accumulation + micro, rows, cfg.resolution)
            crops = np.stack([data.crop(i, o) for i, o in zip(idx, offset, strict=True)])
            x0 = torch.from_numpy(crops).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
            x0 = torch.where(
                torch.from_numpy(flip).to(device)[:, None, None, None], x0.flip(-1), x0
            )
            noise, t = noise.to(device, non_blocking=True), t.to(device, non_blocking=True)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), as scheduler.add_noise
            last = micro == cfg.grad_accumulation - 1
            with model.no_sync() if ranks.world > 1 and not last else nullcontext():
                with torch.autocast(device.type, dtype=autocast or torch.float32,
                                    enabled=autocast is not None):  # fmt: skip
                    y = labels[torch.from_numpy(idx)].to(device)
                    pred = model(xt, t, class_labels=y).sample.float()
                if cfg.learn_sigma:  # L_hybrid = L_simple + L_vlb (improved DDPM)
                    eps_pred, var_pred = pred.split(3, dim=1)
                    vlb = vlb_term(alphas, x0, xt, t, eps_pred, var_pred).mean()
                    loss = F.mse_loss(eps_pred, noise) + vlb_scale * vlb
                else:
                    loss = F.mse_loss(pred, noise)
                (loss / cfg.grad_accumulation).backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        if not torch.isfinite(norm):  # one overflowing batch must not turn every weight NaN
            opt.zero_grad(set_to_none=True)
            nonfinite += 1
            bad_run += 1
            log.warning("step %d: non-finite gradient norm, update skipped", step + 1)
            if bad_run >= MAX_NONFINITE_IN_A_ROW:
                msg = (
                    f"{bad_run} non-finite updates in a row at step {step + 1}: training "
                    f"diverged; lower --lr and --resume from the last checkpoint"
                )
                raise FloatingPointError(msg)
        else:
            bad_run = 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())
        step += 1
        loss_sum += loss.detach()
        loss_n += 1
        bar.update(1)
        if step % LOG_EVERY_STEPS == 0 or step == cfg.steps:
            mean_loss, loss_sum, loss_n = loss_sum.item() / loss_n, loss_sum.zero_(), 0
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if ranks.main and not tty and time.perf_counter() - last_log >= LOG_EVERY_S:
            last_log = time.perf_counter()
            per_step = (last_log - run_t0) / (step - first_step)
            log.info(
                "step %d/%d, loss %.4f (mean of the last %d steps read), %.2f s/step, "
                "%.0f min to go",
                step, cfg.steps, mean_loss, LOG_EVERY_STEPS, per_step,
                (cfg.steps - step) * per_step / 60,
            )  # fmt: skip
        if ranks.main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save_checkpoint(
                out,
                step,
                {
                    "step": step,
                    "elapsed_s": time.perf_counter() - t0,
                    "skipped_nonfinite": nonfinite,
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_gen": gen.get_state(),
                    "data_fingerprint": data.fingerprint,
                    "world_size": ranks.world,
                    "config": asdict(cfg),
                },
            )
    bar.close()
    wall = time.perf_counter() - t0
    if not ranks.main:
        dist.barrier()  # rank 0 writes the model folder
        if not had_group:
            dist.destroy_process_group()
        return ""

    ema.copy_to(unet.parameters())
    unet.eval()
    card = {
        "categories": data.categories,
        "resolution": cfg.resolution,
        "preset": cfg.preset,
        "train_steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "world_size": ranks.world,
        "grad_accumulation": cfg.grad_accumulation,
        "learning_rate": cfg.learning_rate,
        "ema_decay": cfg.ema_decay,
        "num_images": int(len(data.images)),
        "skipped_images": data.skipped,
        "grey_categories": data.grey,
        "aspect": "short side to resolution, random square crops",
        "data": cfg.data,
        "data_fingerprint": data.fingerprint,
        "train_wall_s": round(wall, 1),
        "skipped_nonfinite_updates": nonfinite,
        "device": str(device),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "prediction_type": "epsilon",
        "variance_type": scheduler.config.variance_type,
        "learn_sigma": cfg.learn_sigma,
    }
    if provenance:
        card["init_from"] = {k: v for k, v in provenance.items() if k != "architecture"}
        if provenance["architecture"]:
            card["architecture"] = provenance["architecture"]
    model_id = save_model(out, unet.cpu(), scheduler, card, half=cfg.half)
    log.info("saved %s (%s) after %d steps in %.0f s", out, model_id, step, wall)
    if ranks.world > 1:
        dist.barrier()
        if not had_group:
            dist.destroy_process_group()
    return model_id
