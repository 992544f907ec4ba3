"""The SDAS sampling pipeline: composes a UNet and an SDAS scheduler, nothing else.

Each sample gets its own CPU ``torch.Generator`` seeded from its own seed, so an image
depends only on (seed, strength, category, model, sampler config), never on its batch.
No Ray, storage or file formats here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from sia_pipeline.diffusion.model import SDASModel
from sia_pipeline.diffusion.sdas import SDASDDIMScheduler, SDASDDPMScheduler

SamplerName = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")


@dataclass
class SDASOutput(BaseOutput):
    """``images``: (B, H, W, 3) uint8 (``output_type="np"``) or (B, 3, H, W) in [-1, 1] ("pt")."""

    images: np.ndarray | torch.Tensor
    strengths: list[float]
    seeds: list[int]


def make_scheduler(scheduler_config: dict, sampler: SamplerName):
    if sampler == "ddpm":
        return SDASDDPMScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        return SDASDDIMScheduler.from_config(scheduler_config)
    msg = f"unknown sampler {sampler!r}; choose one of {SAMPLERS}"
    raise ValueError(msg)


class SDASPipeline(DiffusionPipeline):
    """Class-conditional SDAS sampling with per-sample strengths and seeds."""

    def __init__(self, unet: UNet2DModel, scheduler: SDASDDPMScheduler | SDASDDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_inputs(self, class_labels, anomaly_strength, seeds, num_inference_steps) -> None:
        n = len(seeds)
        if n == 0:
            msg = "empty batch: give at least one seed"
            raise ValueError(msg)
        if len(class_labels) != n or len(anomaly_strength) != n:
            msg = (
                f"class_labels ({len(class_labels)}), anomaly_strength ({len(anomaly_strength)}) "
                f"and seeds ({n}) must have the same length"
            )
            raise ValueError(msg)
        bad = [s for s in anomaly_strength if not (np.isfinite(s) and s >= 0)]
        if bad:
            msg = f"anomaly strength must be finite and >= 0, got {bad}"
            raise ValueError(msg)
        n_classes = self.unet.config.num_class_embeds
        if n_classes is not None and any(not 0 <= c < n_classes for c in class_labels):
            msg = f"class ids must be in [0, {n_classes}), got {list(class_labels)}"
            raise ValueError(msg)
        if not 1 <= num_inference_steps <= self.scheduler.config.num_train_timesteps:
            msg = (
                f"num_inference_steps must be in [1, {self.scheduler.config.num_train_timesteps}], "
                f"got {num_inference_steps}"
            )
            raise ValueError(msg)

    @torch.inference_mode()
    def __call__(
        self,
        class_labels: Sequence[int],
        anomaly_strength: Sequence[float],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        eta: float = 0.0,
        output_type: Literal["np", "pt"] = "np",
    ) -> SDASOutput:
        self.check_inputs(class_labels, anomaly_strength, seeds, num_inference_steps)
        device = self.unet.device
        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        size = self.unet.config.sample_size
        shape = (len(seeds), self.unet.config.in_channels, size, size)
        image = randn_tensor(shape, generator=generators, device=device, dtype=self.unet.dtype)
        labels = torch.as_tensor(list(class_labels), device=device, dtype=torch.long)
        strength = torch.as_tensor(list(anomaly_strength), device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = {"eta": eta} if isinstance(self.scheduler, SDASDDIMScheduler) else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(
                model_output, t, image, generator=generators, anomaly_strength=strength, **extra
            ).prev_sample

        image = image.clamp(-1, 1)
        if output_type == "np":
            image = to_uint8(image)
        return SDASOutput(
            images=image,
            strengths=[float(s) for s in anomaly_strength],
            seeds=[int(s) for s in seeds],
        )


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class Sampler:
    """Samples a loaded :class:`SDASModel` by category name; the unit that workers hold."""

    def __init__(
        self, model: SDASModel, sampler: SamplerName = "ddpm", steps: int = 20, eta: float = 0.0
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.pipe = SDASPipeline(model.unet, make_scheduler(model.scheduler_config, sampler))
        self.pipe.set_progress_bar_config(disable=True)

    def config(self) -> dict:
        """The sampler fields every SIA sample records."""
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "model_id": self.model.model_id,
        }

    def sample(
        self, categories: Sequence[str], strengths: Sequence[float], seeds: Sequence[int]
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB images, one per (category, strength, seed)."""
        labels = [self.model.class_id(c) for c in categories]
        return self.pipe(
            labels, strengths, seeds, num_inference_steps=self.steps, eta=self.eta
        ).images
