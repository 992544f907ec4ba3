"""Train RealNet on one category: normal images + composites from SIA shards or textures.

Reads top to bottom like nanoGPT's ``train.py``: config, data, model (AFS chosen once on
synthetic anomalies), optimiser, loop. Checkpoints carry ``model_args`` so evaluation
rebuilds the model from the file alone; ``resume`` continues from ``OUT/last.pt``. The
trainer never looks at the test split; a few ``train/good`` images are held out to
calibrate the decision threshold (:mod:`realnet_train.calibration`).

Under ``torchrun`` each rank reads its own share of shards and normal images, gradients are
averaged by DDP, and rank 0 alone writes checkpoints and the log. Bad data (unreadable or
contradicting samples) is skipped and counted; past ``max_bad_samples`` the run saves a
resumable checkpoint and stops with :class:`TooManyBadSamples`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from realnet_train import distributed
from realnet_train.calibration import calibration_record, holdout_split
from realnet_train.checkpoint import CHECKPOINT_NAME, checkpoint_dict, load_model, save_checkpoint
from realnet_train.data.mvtec import MVTecCategory
from realnet_train.data.sia_stream import sia_pipeline
from realnet_train.data.sources import TextureSource, parse_mix
from realnet_train.data.train_stream import CompositeStream, StreamConfig
from realnet_train.model.afs import channel_mask_errors
from realnet_train.model.realnet import RealNet, RealNetConfig, realnet_losses
from realnet_train.presets import CPU, LR_SCHEDULES
from sia_pipeline.compose import choose_rule

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # progress lines when stderr is not a terminal
SYNC_EVERY = 25  # steps between reads of the losses from the device (and cross-rank checks)

LOG_NAME = "train_log.json"
BAD_EXAMPLES = 50  # bad-sample records kept in the log (the count is always complete)
DATA_TIMEOUT_S = 600  # longest wait for one batch from the DataLoader workers
__all__ = ["TooManyBadSamples", "TrainConfig", "build_loader", "load_model", "to_tensor", "train"]


class TooManyBadSamples(RuntimeError):
    """More bad samples than ``max_bad_samples``; a resumable checkpoint was written."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved in checkpoints and ``train_log.json``.

    Defaults are the ``cpu`` preset (:mod:`realnet_train.presets`).
    """

    category: str
    data: str
    out: str
    sia: str | None = None
    textures: str | None = None
    mix: str = "normal=0.5,sia=0.5"
    strength_range: tuple[float, float] | None = None
    image_size: int = CPU.train["image_size"]
    crop_size: int | None = CPU.train["crop_size"]  # None: train on whole images
    resize: str = CPU.train["resize"]  # "squash" or "letterbox": how images fit the square
    batch_size: int = CPU.train["batch_size"]
    steps: int = CPU.train["steps"]
    time_budget_s: float | None = CPU.train["time_budget_s"]
    lr: float = CPU.train["lr"]
    lr_schedule: str = CPU.train["lr_schedule"]  # "constant" or "cosine" (see learning_rate)
    afs_batches: int = CPU.train["afs_batches"]
    checkpoint_every: int = 100
    max_bad_samples: int = 20
    holdout: float = 0.1  # share of train/good held out to calibrate the threshold
    target_fpr: float = 0.05
    device: str | None = None  # None: CUDA when available
    num_workers: int = 1
    threads: int | None = None
    seed: int = 0
    resume: bool = False
    endpoint_url: str | None = None
    foreground: str | None = None  # None: the authors' table, else auto
    preset: str = CPU.name
    model: RealNetConfig = field(default_factory=lambda: RealNetConfig(**CPU.model))


def to_tensor(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """:func:`to_tensor` on ``device``: the uint8 batch crosses the bus (a quarter of the
    float bytes; ``non_blocking`` from the loader's pinned memory), then becomes float there."""
    return to_tensor(images.to(device, non_blocking=True))


def build_loader(
    cfg: TrainConfig,
    mvtec: MVTecCategory,
    seed: int,
    normals: np.ndarray | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """The training DataLoader over ``normals`` (default: every ``train/good`` image);
    ``pin_memory`` for a CUDA trainer."""
    mix = parse_mix(cfg.mix)
    if normals is None:
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
            keep_bad=True,
        )
    textures = None
    if cfg.textures and mix["texture"] > 0:
        textures = TextureSource(cfg.textures, cfg.image_size, cfg.endpoint_url)
    rule = choose_rule(cfg.category, cfg.foreground, list(normals[:8]))
    log.info("%s: foreground rule %s", cfg.category, rule.describe())
    stream = CompositeStream(
        normals,
        StreamConfig(cfg.image_size, mix, rule, seed, crop=cfg.crop_size),
        sia=sia,
        textures=textures,
    )
    return DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        timeout=DATA_TIMEOUT_S if cfg.num_workers > 0 else 0,  # a stuck read fails, not hangs
        pin_memory=pin_memory,
    )


def anomaly_only_mix(spec: str) -> str:
    """The mix for AFS, as the authors: no normal images, the anomaly sources equally likely."""
    sources = [name for name, p in parse_mix(spec).items() if name != "normal" and p > 0]
    if not sources:
        msg = f"AFS needs synthetic anomalies, but the mix {spec!r} has none (sia or texture > 0)"
        raise ValueError(msg)
    return ",".join(f"{name}={1.0 / len(sources)}" for name in sources)


@torch.no_grad()
def fit_afs(
    model: RealNet, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | None = None
) -> None:
    """Choose AFS channels from batches of synthetic anomalies (the authors' measure).

    Args:
        model: the model whose ``afs`` is fitted (its backbone gives the features).
        batches: ``{"image", "clean", "mask"}`` batches, (B, S, S, 3) uint8 and (B, S, S).
        device: where the backbone runs.
    """
    errors: dict[str, torch.Tensor] = {}
    n_images = 0
    for batch in batches:
        clean = model.backbone(to_device(batch["clean"], device))
        anom = model.backbone(to_device(batch["image"], device))
        masks = batch["mask"].to(device)
        for lv, f in clean.items():
            errors[lv] = errors.get(lv, 0) + channel_mask_errors(f, anom[lv], masks)
        n_images += masks.shape[0]
    model.afs.fit(errors)
    log.info(
        "AFS fitted on %d anomalous images: %s",
        n_images,
        {lv: model.afs.indices(lv).numel() for lv in model.afs.levels},
    )


def make_optimizer(params: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam over ``params`` (on ``device``), fused where torch has a fused kernel.

    Same update as the per-parameter loop; on 2 CPU cores the fused kernel takes about a
    third of its time (``bench/realnet_profile.py``), a few percent of a step.
    """
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, fused=fused)


def learning_rate(base: float, schedule: str, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the first step, 1 at the end of the run).

    ``constant`` keeps ``base`` (the authors'); ``cosine`` decays it to 0 along half a cosine
    (torch's ``CosineAnnealingLR`` with ``eta_min=0``), so a short run ends on settled
    weights rather than on the last noisy step at full rate.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 0.5 * base * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    msg = f"unknown lr schedule {schedule!r}; choose from {LR_SCHEDULES}"
    raise ValueError(msg)


class TrainStep(nn.Module):
    """One step's forward as a module, so DDP can wrap it: (images, clean, masks) -> losses.

    Clean and anomalous images share one backbone pass; losses as :func:`realnet_losses`.
    """

    def __init__(self, model: RealNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Args: images, clean (B, 3, H, W) in [0, 1]; masks (B, H, W) in {0, 1}."""
        b = images.shape[0]
        feats = self.model.selected_features(torch.cat([images, clean]))  # lv -> (2B, K, h, w)
        out = self.model.forward_features({lv: f[:b] for lv, f in feats.items()}, images.shape[-2:])
        return realnet_losses(out, {lv: f[b:] for lv, f in feats.items()}, masks)


class BadData:
    """Bad samples, each counted once by (shard, key) however often it is read.

    A sample read again on a later epoch, by the AFS stream and then the training stream, or
    by another rank, is one bad sample: :attr:`records` holds each once, in the order first
    seen. Records this rank has not yet shared wait in :attr:`new` (see :meth:`share`).
    """

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.new: list[dict] = []
        self._seen: set[tuple[str | None, str | None]] = set()

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for r in self.records:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        return kinds

    def _take(self, r: dict) -> bool:
        ident = (r.get("shard"), r.get("key"))
        if ident in self._seen:
            return False
        self._seen.add(ident)
        self.records.append(r)
        return True

    def add(self, records: list[dict]) -> None:
        for r in records:
            if self._take(r):
                self.new.append(r)

    def add_batch(self, batch: dict[str, Any]) -> None:
        for text in batch.get("bad", []):
            if text and text != "[]":
                self.add(json.loads(text))

    def share(self, dist: distributed.DistInfo) -> None:
        """Merge every rank's new records (a collective: call on all ranks together, only
        when some rank has new ones); afterwards every rank holds the same set."""
        mine, self.new = self.new, []
        for records in distributed.gather_objects(mine, dist):
            for r in records:  # type: ignore[union-attr]
                self._take(r)


@torch.no_grad()
def calibrate(
    model: RealNet, images: np.ndarray, names: list[str], cfg: TrainConfig, device: torch.device
) -> dict[str, Any] | None:
    """Score held-out good images (N, S, S, 3) uint8; the threshold record (None if none)."""
    if len(images) == 0:
        log.warning("no held-out good images (--holdout 0): no calibrated threshold")
        return None
    model.eval()
    scores = [
        model(to_tensor(torch.from_numpy(images[i : i + 16])).to(device)).image_score.cpu()
        for i in range(0, len(images), 16)
    ]
    model.train()
    record = calibration_record(torch.cat(scores).numpy(), cfg.target_fpr, names)
    log.info(
        "threshold %.4f for FPR %.3f on %d held-out good images",
        record["threshold"],
        cfg.target_fpr,
        len(images),
    )
    return record


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the log written to ``OUT/train_log.json``.

    Raises:
        TooManyBadSamples: more than ``cfg.max_bad_samples`` bad samples (checkpoint saved).
    """
    dist = distributed.setup(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        distributed.teardown(dist)


def _train(cfg: TrainConfig, dist: distributed.DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    if dist.is_main:
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
    model.to(dist.device)

    mvtec = MVTecCategory(cfg.data, cfg.category, cfg.endpoint_url, fit=cfg.resize)
    keep, held = holdout_split(len(mvtec.train_items), cfg.holdout, cfg.seed)
    held_items = [mvtec.train_items[i] for i in held]
    normals = mvtec.load_train(cfg.image_size, [mvtec.train_items[i] for i in keep])
    bad = BadData()
    bad.add(mvtec.skipped)
    if ckpt is None and dist.is_main:  # other ranks get rank 0's choice just below
        # As the authors: AFS sees synthetic anomalies only, from its own stream.
        afs_cfg = replace(cfg, mix=anomaly_only_mix(cfg.mix), num_workers=0)
        afs_stream = iter(build_loader(afs_cfg, mvtec, seed=cfg.seed + 7919, normals=normals))

        def afs_batches() -> Iterator[dict[str, torch.Tensor]]:
            for _ in range(cfg.afs_batches):
                b = next(afs_stream)
                bad.add_batch(b)
                yield b

        fit_afs(model, afs_batches(), dist.device)
        del afs_stream
    distributed.broadcast_state(model, dist)  # every rank starts from rank 0's AFS and weights
    cuda = dist.device.type == "cuda"
    loader = build_loader(cfg, mvtec, seed=cfg.seed + start, normals=normals, pin_memory=cuda)
    batches = iter(loader)
    if dist.enabled:
        # As the authors: batch statistics (RRS ranking, head) over the global batch, and
        # every rank's running statistics the same.
        distributed.convert_sync_batchnorm(model)
    opt = make_optimizer(model.trainable_parameters(), cfg.lr, dist.device)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    step_fn: nn.Module = TrainStep(model)
    if dist.enabled:
        ids = [dist.device.index] if cuda else None
        # buffers are the frozen backbone's, the fixed AFS choice, and SyncBatchNorm
        # statistics equal on every rank: nothing to re-send each step
        step_fn = DistributedDataParallel(step_fn, device_ids=ids, broadcast_buffers=False)

    def checkpoint(step: int, **extra: Any) -> None:
        if dist.is_main:
            train_config = {**asdict(cfg), "model": model.config.to_dict()}
            fields = {"optimizer": opt.state_dict(), "step": step, "category": cfg.category}
            fields |= {"image_size": cfg.image_size, "train_config": train_config}
            save_checkpoint(ckpt_path, checkpoint_dict(model, **fields, **extra))
        distributed.barrier(dist)

    model.train()
    t0 = time.perf_counter()
    wait_s = compute_s = 0.0
    samples = 0
    step = start
    stopped = None
    total = cfg.steps if cfg.time_budget_s is None else None  # a time budget has no step count
    # A bar on a terminal; in a log file (a background run) one line a minute instead of
    # megabytes of carriage returns.
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=start,
        desc=f"train {cfg.category}",
        unit="step",
        mininterval=5,
        disable=not (dist.is_main and tty),
    )
    # The losses stay on the device and are read every SYNC_EVERY steps in one transfer:
    # a GPU is never made to wait for the host in between (no .item() per step).
    pending: list[torch.Tensor] = []

    def read_losses() -> None:
        if pending:
            for recon, seg in torch.stack(pending).tolist():
                history["recon"].append(recon)
                history["seg"].append(seg)
            pending.clear()
            bar.set_postfix(recon=f"{history['recon'][-1]:.3f}", seg=f"{history['seg'][-1]:.3f}")

    last_log = t0
    total_bad, time_progress = bad.count, 0.0
    while True:
        # The stop checks take one collective on several ranks, so there they run every
        # SYNC_EVERY steps and at the last (every rank at the same step: every rank stops
        # at the same step, with the same bad samples, and sees the same mean elapsed time
        # for the lr schedule); on one process they cost nothing and run every step.
        at_end = step >= cfg.steps
        if at_end or not dist.enabled or (step - start) % SYNC_EVERY == 0:
            elapsed = time.perf_counter() - t0
            over_time = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s
            timed_out, new_bad, elapsed_sum = distributed.sum_across(
                [float(over_time), len(bad.new), elapsed], dist
            )
            if new_bad:  # rare: merge the ranks' new bad samples, so none is counted twice
                bad.share(dist)
            total_bad = bad.count
            if at_end or total_bad > cfg.max_bad_samples:
                break
            if timed_out:
                log.info("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
                break
            if cfg.time_budget_s is not None:
                time_progress = elapsed_sum / dist.world_size / cfg.time_budget_s
        t_wait = time.perf_counter()
        batch = next(batches)
        bad.add_batch(batch)
        t_compute = time.perf_counter()
        images = to_device(batch["image"], dist.device)
        clean = to_device(batch["clean"], dist.device)
        losses = step_fn(images, clean, batch["mask"].to(dist.device, non_blocking=True))
        # Progress through the run: by steps, or by the time budget when that is further on.
        progress = max(step / cfg.steps, time_progress)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.lr, cfg.lr_schedule, progress)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        pending.append(torch.stack([losses["recon"].detach(), losses["seg"].detach()]))
        step += 1
        samples += images.shape[0]
        bar.update(1)
        now = time.perf_counter()
        log_now = dist.is_main and not tty and now - last_log >= LOG_EVERY_S
        if step % SYNC_EVERY == 0 or log_now:
            read_losses()  # waits for the device: compute_s counts its work, not its queue
        wait_s += t_compute - t_wait
        compute_s += time.perf_counter() - t_compute
        if log_now:
            last_log = time.perf_counter()
            log.info(
                "step %d%s, recon %.3f, seg %.3f, %.2f s/step",
                step, f"/{total}" if total else "", history["recon"][-1], history["seg"][-1],
                (last_log - t0) / (step - start),
            )  # fmt: skip
        if step % cfg.checkpoint_every == 0:
            checkpoint(step)
    read_losses()
    bar.close()
    calibration = None
    if total_bad > cfg.max_bad_samples:
        stopped = f"{int(total_bad)} bad samples (limit --max-bad-samples {cfg.max_bad_samples})"
    elif dist.is_main:
        held_images = mvtec.load_train(cfg.image_size, held_items) if held_items else normals[:0]
        calibration = calibrate(
            model, held_images, [it.image for it in held_items], cfg, dist.device
        )
    checkpoint(step, calibration=calibration)
    wall = time.perf_counter() - t0
    kinds = ("unreadable", "rejected")
    sums = {k: bad.by_kind.get(k, 0) for k in kinds}  # the same on every rank after share()
    params = [float(sum(p.detach().double().sum() for p in model.trainable_parameters()))]
    result = {
        "category": cfg.category,
        "step": step,
        "steps_this_run": step - start,
        "samples_this_run": samples,
        "world_size": dist.world_size,
        "wall_s": wall,
        "data_wait_s": wait_s,
        "compute_s": compute_s,
        "trainer_samples_per_s": samples / compute_s if compute_s else None,
        "checkpoint": str(ckpt_path),
        "stopped": stopped,
        "bad_samples": {
            "count": int(total_bad),
            "unreadable": int(sums["unreadable"]),
            "rejected": int(sums["rejected"]),
            "limit": cfg.max_bad_samples,
            "examples": bad.records[:BAD_EXAMPLES],  # each (shard, key) once
        },
        "rank_param_sums": [x for (x,) in distributed.gather_objects(params, dist)],
        "calibration": calibration,
        "config": {**asdict(cfg), "model": model.config.to_dict()},
        "foreground": loader.dataset.config.foreground.to_dict(),
        "history": history,
    }
    if dist.is_main:
        (out / LOG_NAME).write_text(json.dumps(result, indent=1))
    if stopped:
        msg = f"stopped at step {step} after {stopped}; fix the data or raise it, then --resume"
        raise TooManyBadSamples(msg)
    log.info("trained %s to step %d in %.0f s (data wait %.0f s)", cfg.category, step, wall, wait_s)
    return result
