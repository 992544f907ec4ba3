"""The SDAS sampling pipeline: composes a UNet, an SDAS scheduler and optional guidance.

Each sample gets its own CPU ``torch.Generator`` seeded from its own seed, so an image
depends only on (seed, strength, category, model, sampler config), never on its batch.
Classifier guidance (:mod:`.guidance`) adds its shift to each step's ``prev_sample``. For
speed the UNet may run under bf16/fp16 autocast (the scheduler maths stay float32), in
channels_last memory format and under ``torch.compile``. No Ray, storage or file formats here.

The step loop never waits on the host: the strengths are checked once on the host, the
scheduler gets Python-int timesteps from a host copy of the schedule (the UNet and the
classifier the device tensor), a step below ``strength_min_t`` gets a zero strength tensor
made before the loop (chosen by the host int), and every step's noise is drawn before the
loop needs it
(:class:`StepNoise`: on CUDA a helper thread draws from the per-sample generators into
pinned memory, copied ``non_blocking``), each generator drawing exactly what the
schedulers' own draws took, so images stay those of the per-sample generator streams.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput

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


def configure_cuda() -> None:
    """Production settings for sampling on CUDA (process-wide): TF32 tensor cores for
    float32 matmuls and convolutions, and cuDNN autotuning (shapes are fixed). Every CUDA
    :class:`Sampler` applies them, so sia-gen, regeneration and the benchmarks agree."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


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


Plan = list[tuple[list[int], torch.dtype]]


class StepNoise:
    """A batch's noise, drawn from per-sample CPU generators ahead of the steps that use it.

    ``plan[k] = (rows, dtype)``: at draw k (draw 0 the starting noise, draw k + 1 step k's
    ``z``) the generators of ``rows`` each draw one ``(1, C, H, W)`` tensor, as diffusers'
    ``randn_tensor`` would; other rows are zeros, and no rows give None. With ``prefetch``
    one helper thread draws up to ``depth`` draws ahead (into pinned memory when ``device``
    is CUDA; the caching host allocator keeps a block until its ``non_blocking`` copy is
    done). The values never depend on ``prefetch``: each generator is used in plan order
    by one thread.

    Args:
        generators: one per sample.
        shape: ``(B, C, H, W)``.
        plan: what each draw takes.
        device: where :meth:`next` puts each draw.
        prefetch: draw ahead on a thread (None: on CUDA only).
        depth: draws kept ready.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        shape: tuple[int, ...],
        plan: Plan,
        device: torch.device,
        prefetch: bool | None = None,
        depth: int = 2,
    ) -> None:
        self.generators = list(generators)
        self.shape = tuple(shape)
        self.plan = plan
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.pin = cuda and torch.cuda.is_available()
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None
        self._ready: list[Future] = []
        if cuda if prefetch is None else prefetch:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdas-noise")
            for k in range(min(depth, len(plan))):
                self._ready.append(self._pool.submit(self._draw, k))

    def _draw(self, k: int) -> torch.Tensor | None:
        rows, dtype = self.plan[k]
        if not rows:
            return None
        make = torch.empty if len(rows) == self.shape[0] else torch.zeros
        out = make(self.shape, dtype=dtype, pin_memory=self.pin)
        for i in rows:
            out[i : i + 1].normal_(generator=self.generators[i])
        return out

    def next(self) -> torch.Tensor | None:
        """The next draw on ``device`` (None when no generator draws there)."""
        k = self._next
        if k >= len(self.plan):
            msg = f"all {len(self.plan)} planned draws are taken"
            raise IndexError(msg)
        self._next += 1
        if self._pool is None:
            host = self._draw(k)
        else:
            host = self._ready.pop(0).result()
            ahead = k + len(self._ready) + 1
            if ahead < len(self.plan):
                self._ready.append(self._pool.submit(self._draw, ahead))
        if host is None:
            return None
        return host.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        """Stop drawing ahead (waits for a draw in progress, drops the queued ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> StepNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SDASPipeline(DiffusionPipeline):
    """Class-conditional SDAS sampling with per-sample strengths and seeds."""

    def __init__(self, unet: UNet2DModel, scheduler: SDASDDPMScheduler | SDASDDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # what the loop calls: the UNet itself, or its torch.compile'd wrapper
        self.denoiser = unet
        self.channels_last = False

    def enable_speedups(self, channels_last: bool = False, compile: bool = False) -> None:
        """channels_last weights and inputs; ``torch.compile`` with static shapes (compiled
        on the first call; callers keep the batch size fixed, see ``Sampler.sample``)."""
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            self.denoiser = torch.compile(self.unet, dynamic=False)

    def check_inputs(
        self, class_labels, anomaly_strength, seeds, num_inference_steps, strength_min_t=0
    ) -> None:
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
        check_strength_min_t(strength_min_t, self.scheduler.config.num_train_timesteps)

    def denoise_step(
        self,
        image: torch.Tensor,
        t: int | torch.Tensor,
        labels: torch.Tensor,
        generators: list[torch.Generator] | None,
        strength: torch.Tensor,
        eta: float = 0.0,
        guidance: ClassifierGuidance | None = None,
        dtype: torch.dtype | None = None,
        *,
        noise: torch.Tensor | None = None,
        model_timestep: torch.Tensor | None = None,
        check_strength: bool = True,
    ) -> torch.Tensor:
        """One reverse step ``x_t -> x_{t-1}``: UNet, SDAS scheduler step, guidance shift.

        Args:
            image: ``x_t``, (B, C, H, W) float32.
            t: the current timestep (an int; a tensor is read on the host).
            labels: (B,) class ids.
            generators: one per sample, drawing this step's noise (None: ``noise``).
            strength: (B,) anomaly strengths.
            eta: DDIM eta (DDPM ignores it).
            guidance: classifier guidance, or None.
            dtype: autocast dtype of the UNet (None: float32).
            noise: this step's ``z`` drawn ahead (rows the scheduler's ``noise_rows`` names).
            model_timestep: ``t`` as a device tensor for the UNet and the classifier.
            check_strength: check ``strength`` here (the pipeline checked it on the host).

        Returns:
            ``x_{t-1}``, (B, C, H, W) float32.
        """
        t_int = int(t)
        t_model = model_timestep if model_timestep is not None else t
        x_in = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
        with torch.autocast(
            image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            model_output = self.denoiser(x_in, t_model, class_labels=labels).sample
        model_output = model_output.float().contiguous()
        is_ddim = isinstance(self.scheduler, SDASDDIMScheduler)
        extra = {"eta": eta} if is_ddim else {}
        prev = self.scheduler.step(
            model_output,
            t_int,
            image,
            generator=generators if noise is None else None,
            anomaly_strength=strength,
            variance_noise=noise,
            check_strength=check_strength,
            **extra,
        ).prev_sample
        if guidance is not None:
            prev = prev + guidance.shift(
                self.scheduler, model_output, t_int, image, labels, eta=eta, model_timestep=t_model
            )
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
        prefetch: bool | None = None,
        strength_min_t: int = 0,
    ) -> SDASOutput:
        """Sample one image per (class label, anomaly strength, seed).

        ``guidance`` steers every step towards the sample's class (the gradient needs
        autograd, hence ``no_grad`` rather than ``inference_mode``); ``precision`` runs the
        UNet (and the classifier) under autocast; ``prefetch`` draws the noise ahead on a
        helper thread (None: on CUDA), which changes no value. ``strength_min_t``: the
        strength term only on steps whose timestep ``t >= strength_min_t``, the later ones
        plain DDPM/DDIM (0, the default, is every step: the paper; see :class:`Sampler`).
        """
        self.check_inputs(
            class_labels, anomaly_strength, seeds, num_inference_steps, strength_min_t
        )
        dtype = autocast_dtype(precision)
        device = self.unet.device
        strengths = [float(s) for s in anomaly_strength]
        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        size = self.unet.config.sample_size
        shape = (len(seeds), self.unet.config.in_channels, size, size)
        labels = torch.as_tensor(list(class_labels), device=device, dtype=torch.long)
        strength = torch.as_tensor(strengths, device=device, dtype=self.unet.dtype)
        no_strength = torch.zeros_like(strength)  # the steps below strength_min_t

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timestep_list  # host ints for the scheduler maths
        # device 0-d tensors for the networks (copies, not views: one compiled graph for all)
        t_model = [t.clone() for t in self.scheduler.timesteps.unbind()]
        on = [t >= strength_min_t for t in timesteps]  # host bools: which steps get s
        zeros = [0.0] * len(strengths)
        plan: Plan = [(list(range(len(seeds))), self.unet.dtype)]
        plan += [
            (self.scheduler.noise_rows(t, strengths if k else zeros, eta), torch.float32)
            for t, k in zip(timesteps, on, strict=True)
        ]
        with StepNoise(generators, shape, plan, device, prefetch=prefetch) as noise:
            image = noise.next()
            for i, t in enumerate(self.progress_bar(timesteps)):
                image = self.denoise_step(
                    image,
                    t,
                    labels,
                    None,
                    strength if on[i] else no_strength,
                    eta=eta,
                    guidance=guidance,
                    dtype=dtype,
                    noise=noise.next(),
                    model_timestep=t_model[i],
                    check_strength=False,
                )

        image = image.clamp(-1, 1)
        if output_type == "np":
            image = to_uint8(image)
        return SDASOutput(images=image, strengths=strengths, seeds=[int(s) for s in seeds])


def check_strength_min_t(strength_min_t: int, num_train_timesteps: int) -> None:
    """``strength_min_t`` must be an int timestep of the model's schedule, ``[0, T)``.

    Raises:
        ValueError: naming the value and the allowed range.
    """
    ok = isinstance(strength_min_t, int) and not isinstance(strength_min_t, bool)
    if not ok or not 0 <= strength_min_t < num_train_timesteps:
        msg = (
            f"strength_min_t must be an int in [0, {num_train_timesteps}) (the model's "
            f"timesteps), got {strength_min_t!r}"
        )
        raise ValueError(msg)


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
        channels_last: channels_last weights and inputs (None: on CUDA only). On CUDA the
            production settings of :func:`configure_cuda` apply (TF32, cuDNN autotuning).
        compile: ``torch.compile`` the UNet and the classifier with static shapes (the
            first batch of each shape compiles: pass ``pad_to`` to :meth:`sample`).
        strength_min_t: apply the SDAS strength term only on steps whose scheduler
            timestep ``t >= strength_min_t``; the later, low-noise steps are plain
            DDPM/DDIM. 0 (the default) is every step, as the paper. A departure from the
            paper: on the late steps ``s`` turns into grain rather than structure
            (``bench/results/sia_strength_structure.md``). Must be in ``[0, T)``.
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
        strength_min_t: int = 0,
    ) -> None:
        check_strength_min_t(strength_min_t, model.num_train_timesteps)
        self.model = model
        self.strength_min_t = strength_min_t
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.precision = precision
        self.guidance = guidance
        dtype = autocast_dtype(precision)
        if guidance is not None and guidance.autocast_dtype is None:
            guidance.autocast_dtype = dtype
        if guidance is not None and compile:
            guidance.classifier = torch.compile(guidance.classifier, dynamic=False)
        self.pipe = SDASPipeline(model.unet, make_scheduler(model.scheduler_config, sampler))
        self.pipe.set_progress_bar_config(disable=True)
        cuda = model.unet.device.type == "cuda"
        if cuda:
            configure_cuda()
        if channels_last is None:
            channels_last = cuda
        self.pipe.enable_speedups(channels_last=channels_last, compile=compile)

    def config(self) -> dict:
        """The sampler fields every SIA sample records (guidance, precision and
        ``strength_min_t`` only when used)."""
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
        if self.strength_min_t:
            cfg["strength_min_t"] = self.strength_min_t
        return cfg

    def sample(
        self,
        categories: Sequence[str],
        strengths: Sequence[float],
        seeds: Sequence[int],
        pad_to: int | None = None,
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB images, one per (category, strength, seed); images of the
        model's greyscale categories are grey (R = G = B).

        ``pad_to``: a shorter batch is filled up to this size with throw-away samples (the
        first sample's category and strength, seeds counting down from 2**64 - 1, above
        every key's seed) whose images are dropped, so a compiled sampler sees one shape.
        Each image depends only on its own seed, so the kept ones are those of an unpadded
        batch of the same size.
        """
        n = len(seeds)
        if pad_to is not None and n < pad_to:
            fill = pad_to - n
            categories = [*categories, *[categories[0]] * fill]
            strengths = [*strengths, *[strengths[0]] * fill]
            seeds = [*seeds, *[2**64 - 1 - k for k in range(fill)]]
        labels = [self.model.class_id(c) for c in categories]
        images = self.pipe(
            labels,
            strengths,
            seeds,
            num_inference_steps=self.steps,
            eta=self.eta,
            guidance=self.guidance,
            precision=self.precision,
            strength_min_t=self.strength_min_t,
        ).images[:n]
        grey = [c in self.model.grey_categories for c in categories[:n]]
        return to_grey(images, grey) if any(grey) else images

    def warm_up(self, category: str, batch_size: int, strength: float = 0.0) -> float:
        """Sample one throw-away batch (compiles, autotunes cuDNN); returns its seconds."""
        t0 = time.perf_counter()
        self.sample([category], [strength], [2**64 - 1], pad_to=batch_size)
        return time.perf_counter() - t0


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
