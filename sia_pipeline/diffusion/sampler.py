"""The SDAS sampling pipeline: composes a UNet, an SDAS scheduler and optional guidance.

Each sample gets its own CPU ``torch.Generator`` seeded from its own seed, so an image
depends only on (seed, strength, category, model, sampler config), never on its batch.
Classifier guidance (:mod:`.guidance`) adds its shift to each step's ``prev_sample``. For
speed the UNet may run under bf16/fp16 autocast (the scheduler maths stay float32), in
channels_last memory format and under ``torch.compile``. No Ray, storage or file formats here.
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

from sia_pipeline.diffusion.guidance import ClassifierGuidance
from sia_pipeline.diffusion.model import SDASModel
from sia_pipeline.diffusion.sdas import SDASDDIMScheduler, SDASDDPMScheduler
from sia_pipeline.format.genspec import SAMPLERS

SamplerName = Literal["ddpm", "ddim"]
Precision = Literal["fp32", "bf16", "fp16"]
# autocast dtype of each --precision (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        msg = f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        raise ValueError(msg)
    return PRECISIONS[precision]


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
        # what the loop calls: the UNet itself, or its torch.compile'd wrapper
        self.denoiser = unet
        self.channels_last = False

    def enable_speedups(self, channels_last: bool = False, compile: bool = False) -> None:
        """channels_last weights and inputs; ``torch.compile`` (compiled on the first call)."""
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            self.denoiser = torch.compile(self.unet)

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

    def denoise_step(
        self,
        image: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        generators: list[torch.Generator],
        strength: torch.Tensor,
        eta: float = 0.0,
        guidance: ClassifierGuidance | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One reverse step ``x_t -> x_{t-1}``: UNet, SDAS scheduler step, guidance shift.

        Args:
            image: ``x_t``, (B, C, H, W) float32.
            t: the current timestep (0-d).
            labels: (B,) class ids.
            generators: one per sample.
            strength: (B,) anomaly strengths.
            eta: DDIM eta (DDPM ignores it).
            guidance: classifier guidance, or None.
            dtype: autocast dtype of the UNet (None: float32).

        Returns:
            ``x_{t-1}``, (B, C, H, W) float32.
        """
        x_in = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
        with torch.autocast(
            image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            model_output = self.denoiser(x_in, t, class_labels=labels).sample
        model_output = model_output.float().contiguous()
        is_ddim = isinstance(self.scheduler, SDASDDIMScheduler)
        extra = {"eta": eta} if is_ddim else {}
        prev = self.scheduler.step(
            model_output, t, image, generator=generators, anomaly_strength=strength, **extra
        ).prev_sample
        if guidance is not None:
            prev = prev + guidance.shift(self.scheduler, model_output, t, image, labels, eta=eta)
        return prev

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int],
        anomaly_strength: Sequence[float],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        eta: float = 0.0,
        output_type: Literal["np", "pt"] = "np",
        guidance: ClassifierGuidance | None = None,
        precision: Precision = "fp32",
    ) -> SDASOutput:
        """Sample one image per (class label, anomaly strength, seed).

        ``guidance`` steers every step towards the sample's class (the gradient needs
        autograd, hence ``no_grad`` rather than ``inference_mode``); ``precision`` runs the
        UNet (and the classifier) under autocast.
        """
        self.check_inputs(class_labels, anomaly_strength, seeds, num_inference_steps)
        dtype = autocast_dtype(precision)
        device = self.unet.device
        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        size = self.unet.config.sample_size
        shape = (len(seeds), self.unet.config.in_channels, size, size)
        image = randn_tensor(shape, generator=generators, device=device, dtype=self.unet.dtype)
        labels = torch.as_tensor(list(class_labels), device=device, dtype=torch.long)
        strength = torch.as_tensor(list(anomaly_strength), device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            image = self.denoise_step(
                image, t, labels, generators, strength, eta=eta, guidance=guidance, dtype=dtype
            )

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
    """Samples a loaded :class:`SDASModel` by category name; the unit that workers hold.

    Args:
        model: the loaded model.
        sampler: ``ddpm`` or ``ddim``.
        steps: respaced sampling steps.
        eta: DDIM eta.
        guidance: classifier guidance (its classifier must know the model's categories).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast for the UNet and classifier.
        channels_last: channels_last weights and inputs (None: on CUDA only).
        compile: ``torch.compile`` the UNet (the first batch of each shape compiles).
    """

    def __init__(
        self,
        model: SDASModel,
        sampler: SamplerName = "ddpm",
        steps: int = 20,
        eta: float = 0.0,
        *,
        guidance: ClassifierGuidance | None = None,
        precision: Precision = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.precision = precision
        self.guidance = guidance
        dtype = autocast_dtype(precision)
        if guidance is not None and guidance.autocast_dtype is None:
            guidance.autocast_dtype = dtype
        self.pipe = SDASPipeline(model.unet, make_scheduler(model.scheduler_config, sampler))
        self.pipe.set_progress_bar_config(disable=True)
        if channels_last is None:
            channels_last = model.unet.device.type == "cuda"
        self.pipe.enable_speedups(channels_last=channels_last, compile=compile)

    def config(self) -> dict:
        """The sampler fields every SIA sample records (guidance and precision only when used)."""
        cfg = {
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "model_id": self.model.model_id,
        }
        if self.guidance is not None:
            cfg["classifier_id"] = self.guidance.classifier_id
            cfg["classifier_scale"] = self.guidance.scale
        if self.precision != "fp32":
            cfg["precision"] = self.precision
        return cfg

    def sample(
        self, categories: Sequence[str], strengths: Sequence[float], seeds: Sequence[int]
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB images, one per (category, strength, seed); images of the
        model's greyscale categories are grey (R = G = B)."""
        labels = [self.model.class_id(c) for c in categories]
        images = self.pipe(
            labels,
            strengths,
            seeds,
            num_inference_steps=self.steps,
            eta=self.eta,
            guidance=self.guidance,
            precision=self.precision,
        ).images
        grey = [c in self.model.grey_categories for c in categories]
        return to_grey(images, grey) if any(grey) else images


def to_grey(images: np.ndarray, which: Sequence[bool]) -> np.ndarray:
    """``images`` (B, H, W, 3) uint8 with the rows flagged in ``which`` turned to luma
    (ITU-R 601, as PIL's ``convert("L")``) in all three channels.

    A model trained on greyscale parts still mixes in faint colour casts of the RGB categories
    it shares weights with; an inspection camera that sees grey never produces them.
    """
    out = images.copy()
    idx = np.flatnonzero(np.asarray(which, dtype=bool))
    rgb = images[idx].astype(np.float32)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    out[idx] = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    return out
