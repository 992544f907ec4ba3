"""Classifier guidance for SDAS sampling, as RealNet's sampler applies it.

A noisy classifier ``p(y | x_t, t)`` steers each reverse step towards class ``y`` with
``g = scale * grad_x log p(y | x_t, t)`` (Dhariwal & Nichol 2021):

* DDPM (their ``condition_mean``): the step's mean moves by ``Sigma_t * g``, where
  ``Sigma_t`` is the model's reverse variance (learned range, or the fixed one);
* DDIM (their ``condition_score``): ``eps' = eps - sqrt(1 - abar_t) * g``, with ``eps``
  re-derived from the clipped ``x_0``.

Both change only the deterministic part of a step, so each is an additive shift of the
scheduler's ``prev_sample``, computed here from the scheduler's schedule; the SDAS
strength noise (``sigma_t`` from the unguided model variance) is untouched, as in the
authors' ``p_sample`` / ``ddim_sample``. Schedulers stay maths; the pipeline composes
``prev_sample + shift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn


class GuidanceError(ValueError):
    """A classifier or scale that cannot guide this model (one line naming why)."""


def check_scale(scale: float) -> float:
    """A finite ``scale >= 0``, else :class:`GuidanceError`."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        msg = f"--classifier-scale must be a number, got {scale!r}"
        raise GuidanceError(msg) from None
    if not math.isfinite(value) or value < 0:
        msg = f"--classifier-scale must be finite and >= 0, got {scale!r}"
        raise GuidanceError(msg)
    return value


def check_categories(model_categories: Mapping[str, int], classifier_categories: Mapping) -> None:
    """The classifier must name exactly the model's categories with the same class ids."""
    model = {str(k): int(v) for k, v in model_categories.items()}
    clf = {str(k): int(v) for k, v in classifier_categories.items()}
    if model == clf:
        return
    only_model = sorted(set(model) - set(clf))
    only_clf = sorted(set(clf) - set(model))
    moved = sorted(k for k in set(model) & set(clf) if model[k] != clf[k])
    parts = []
    if only_model:
        parts.append(f"missing {', '.join(only_model)}")
    if only_clf:
        parts.append(f"extra {', '.join(only_clf)}")
    if moved:
        parts.append(
            "other class ids for " + ", ".join(f"{k} ({clf[k]} != {model[k]})" for k in moved)
        )
    msg = f"the classifier's categories differ from the model's: {'; '.join(parts)}"
    raise GuidanceError(msg)


class ClassifierGuidance:
    """``scale * grad_x log p(y | x_t, t)`` from a noisy classifier, as a ``prev_sample`` shift.

    Args:
        classifier: ``forward(x (B, C, H, W) in [-1, 1], timesteps (B,) long)`` ->
            logits ``(B, num_classes)``.
        scale: the authors' ``classifier_scale`` (>= 0; 0 computes no gradient).
        classifier_id: recorded with every guided sample.
        autocast_dtype: run the classifier under this autocast dtype (None: as stored).
    """

    def __init__(
        self,
        classifier: nn.Module,
        scale: float,
        classifier_id: str = "",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.classifier = classifier
        self.scale = check_scale(scale)
        self.classifier_id = classifier_id
        self.autocast_dtype = autocast_dtype

    def gradient(
        self, sample: torch.Tensor, timestep: int | torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``scale * d/dx log softmax(classifier(x, t))[y]``, float32 ``(B, C, H, W)``."""
        if self.scale == 0:
            return torch.zeros_like(sample, dtype=torch.float32)
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(b)
        with torch.enable_grad():
            x_in = sample.detach().requires_grad_(True)
            with torch.autocast(
                x_in.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                logits = self.classifier(x_in, t)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs[torch.arange(b, device=labels.device), labels.view(-1)]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad.float() * self.scale

    def shift(
        self,
        scheduler: DDPMScheduler | DDIMScheduler,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        labels: torch.Tensor,
        eta: float = 0.0,
        model_timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What guidance adds to ``scheduler.step(model_output, timestep, sample).prev_sample``.

        Args:
            scheduler: an (SDAS) DDPM or DDIM scheduler with ``set_timesteps`` done.
            model_output: the UNet output at ``x_t`` (``(B, 2C, H, W)`` with learned variance).
            timestep: the current timestep (of the training schedule, e.g. 950).
            sample: ``x_t``, ``(B, C, H, W)``.
            labels: ``(B,)`` class ids to steer towards.
            eta: the DDIM ``eta`` of this step (DDPM ignores it).
            model_timestep: ``timestep`` as a device tensor for the classifier (None: made
                from ``timestep``); with an int ``timestep`` nothing is read on the host.

        Returns:
            ``(B, C, H, W)`` float32.
        """
        t = int(timestep)
        g = self.gradient(sample, model_timestep if model_timestep is not None else t, labels)
        if isinstance(scheduler, DDIMScheduler):
            return ddim_guidance_coefficient(scheduler, t, eta) * g
        if isinstance(scheduler, DDPMScheduler):
            c = sample.shape[1]
            predicted = model_output[:, c:].float() if model_output.shape[1] == 2 * c else None
            return ddpm_guidance_variance(scheduler, t, predicted) * g
        msg = (
            f"classifier guidance supports DDPM and DDIM schedulers, not {type(scheduler).__name__}"
        )
        raise TypeError(msg)


def _posterior_variance(scheduler, t: int, prev_t: int) -> torch.Tensor:
    """``beta_tilde`` of the respaced step ``t -> prev_t`` (``prev_t < 0``: the final step)."""
    ab = scheduler.alphas_cumprod
    a_t = ab[t].double()
    a_prev = ab[prev_t].double() if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def ddpm_guidance_variance(
    scheduler: DDPMScheduler, t: int, predicted_variance: torch.Tensor | None = None
) -> torch.Tensor:
    """The reverse variance ``Sigma_t`` by which a DDPM step's mean moves per unit gradient.

    As in improved-DDPM / RealNet: at the final step (``beta_tilde = 0``) the lower end of
    the learned range is the next step's ``beta_tilde`` (their
    ``posterior_log_variance_clipped``), not diffusers' ``1e-20`` clamp, which would all but
    switch guidance off there. ``fixed_small`` keeps ``beta_tilde`` (0 at the final step),
    ``fixed_large`` uses ``beta_t`` (``beta_tilde`` of the next step at the final one).

    Returns:
        a scalar tensor, or ``(B, C, H, W)`` for learned variances; float32.
    """
    # the SDAS schedulers keep a host copy of the schedule; others' is read here
    timesteps = getattr(scheduler, "timestep_list", None) or [int(x) for x in scheduler.timesteps]
    i = timesteps.index(t)
    prev_t = int(scheduler.previous_timestep(t))
    ab = scheduler.alphas_cumprod
    a_t = ab[t].double()
    a_prev = ab[prev_t].double() if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    beta_t = 1 - a_t / a_prev
    beta_tilde = _posterior_variance(scheduler, t, prev_t)
    # the clipped posterior variance: the final step borrows its predecessor's
    clipped = beta_tilde
    if prev_t < 0 and i > 0:
        clipped = _posterior_variance(scheduler, timesteps[i - 1], t)
    kind = scheduler.config.variance_type
    if kind in ("fixed_small", "fixed_small_log"):
        return beta_tilde.float()
    if kind in ("fixed_large", "fixed_large_log"):
        return (clipped if prev_t < 0 else beta_t).float()
    if predicted_variance is None:
        msg = f"variance_type {kind!r} needs the model's predicted variance channels"
        raise ValueError(msg)
    if kind == "learned":
        return torch.exp(predicted_variance.float())
    if kind == "learned_range":
        min_log = torch.log(torch.clamp(clipped, min=1e-20)).float()
        max_log = torch.log(beta_t).float()
        frac = (predicted_variance.float() + 1) / 2
        return torch.exp(frac * max_log + (1 - frac) * min_log)
    msg = f"classifier guidance does not support variance_type {kind!r}"
    raise ValueError(msg)


def ddim_guidance_coefficient(scheduler: DDIMScheduler, t: int, eta: float = 0.0) -> torch.Tensor:
    """``c_t``: a DDIM step with ``eps' = eps - sqrt(1 - abar_t) g`` moves ``prev_sample`` by
    ``c_t * g``.

    ``x_0' = x_0 + (1 - abar_t) / sqrt(abar_t) * g`` and ``x_{t-1} = sqrt(abar_prev) x_0' +
    sqrt(1 - abar_prev - sigma_t^2) eps'``, so ``c_t = sqrt(abar_prev) (1 - abar_t) /
    sqrt(abar_t) - sqrt(1 - abar_prev - sigma_t^2) sqrt(1 - abar_t)``.
    """
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = (
        scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    ).double()
    sigma2 = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    c = torch.sqrt(a_prev) * (1 - a_t) / torch.sqrt(a_t) - torch.sqrt(
        (1 - a_prev - sigma2).clamp(min=0)
    ) * torch.sqrt(1 - a_t)
    return c.float()


def load_guidance(
    url: str,
    scale: float,
    model_categories: Mapping[str, int],
    resolution: int,
    device: str | torch.device = "cpu",
    endpoint_url: str | None = None,
) -> tuple[ClassifierGuidance, dict]:
    """Load the classifier folder at ``url`` and check that it can guide this model.

    Returns:
        (guidance, the classifier's card).

    Raises:
        GuidanceError: a bad scale (checked before anything is loaded), or a classifier
            whose categories or image size differ from the model's.
        ModelError: a missing or corrupt classifier folder.
    """
    from sia_pipeline.diffusion.classifier import load_classifier

    scale = check_scale(scale)
    module, card = load_classifier(url, device=device, endpoint_url=endpoint_url)
    check_categories(model_categories, card["categories"])
    if int(card["image_size"]) != int(resolution):
        msg = (
            f"the classifier is for {card['image_size']} px images, the model makes {resolution} px"
        )
        raise GuidanceError(msg)
    return ClassifierGuidance(module, scale, classifier_id=str(card["classifier_id"])), card
