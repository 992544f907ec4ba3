"""SDAS: strength-controllable diffusion anomaly synthesis as diffusers scheduler subclasses.

RealNet pushes samples off the normal manifold by inflating the reverse-process noise with a
per-sample anomaly strength ``s >= 0`` (``s = 0`` is ordinary sampling):

* DDPM: ``x_{t-1} = mu_theta(x_t, t) + sqrt(1 + s) * sigma_t * z``
* DDIM: ``x_{t-1} = ddim_update(x_t, t, eta) + sqrt(s) * sigma_t * z``

with no noise at the last step. Both classes delegate all schedule maths to the parent's
``step`` and only add the strength term, so ``s = 0`` is the parent bit for bit. ``s`` is
called ``anomaly_strength`` because diffusers' ``strength`` means img2img's start fraction.

Two choices follow the authors' DDIM (``ddim_sample`` in RealNet's ``gauss_sample.py``):
``eps`` is re-derived from the clipped ``x_0`` (diffusers' ``use_clipped_model_output=True``,
here the default; with ``False`` the two differ only where ``x_0`` was clipped), and ``z`` is
the same draw as DDIM's own ``eta`` noise when ``eta > 0``.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None


def _as_strength(
    anomaly_strength: float | torch.Tensor | None, sample: torch.Tensor
) -> torch.Tensor:
    """Per-sample strength ``(B,)`` broadcastable to ``sample``'s ``(B, C, H, W)``."""
    b = sample.shape[0]
    if anomaly_strength is None:
        s = torch.zeros(b, dtype=sample.dtype, device=sample.device)
    else:
        s = torch.as_tensor(anomaly_strength, dtype=sample.dtype, device=sample.device)
        s = s.expand(b) if s.ndim == 0 else s
    if s.shape != (b,):
        msg = f"anomaly_strength must be a scalar or have shape ({b},), got {tuple(s.shape)}"
        raise ValueError(msg)
    if torch.any(s < 0) or not torch.all(torch.isfinite(s)):
        msg = f"anomaly_strength must be finite and >= 0, got {s.tolist()}"
        raise ValueError(msg)
    return s.view(b, *([1] * (sample.ndim - 1)))


def _generator_list(generator: Generators, batch: int) -> list[torch.Generator]:
    if isinstance(generator, list):
        if len(generator) != batch:
            msg = f"got {len(generator)} generators for a batch of {batch}"
            raise ValueError(msg)
        return generator
    if generator is None:
        msg = "SDAS with anomaly_strength > 0 needs explicit generator(s) for reproducibility"
        raise ValueError(msg)
    return [generator] * batch


def learned_range_log_variance(
    alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, predicted_variance: torch.Tensor
) -> torch.Tensor:
    """Improved-DDPM ``learned_range``: interpolate log(beta_tilde_t) .. log(beta_t) by the model's
    output ``v`` in [-1, 1] (the same rule as ``DDPMScheduler._get_variance``)."""
    beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    beta_tilde = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t
    min_log = torch.log(torch.clamp(beta_tilde, min=1e-20))
    max_log = torch.log(beta_t)
    frac = (predicted_variance + 1) / 2
    return frac * max_log + (1 - frac) * min_log


class SDASDDPMScheduler(DDPMScheduler):
    """``DDPMScheduler`` whose reverse noise is scaled by ``sqrt(1 + anomaly_strength)`` per sample.

    Works with fixed-variance models and with models that predict variance
    (``variance_type="learned_range"``, output channels = 2 x image channels).
    """

    def _sigma(self, t: int, predicted_variance: torch.Tensor | None) -> torch.Tensor | float:
        """Reverse std sigma_t, derived from ``_get_variance`` exactly as the parent does."""
        v = self._get_variance(t, predicted_variance=predicted_variance)
        if self.variance_type == "fixed_small_log":
            return v
        if self.variance_type == "learned_range":
            return torch.exp(0.5 * v)
        return v**0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
        anomaly_strength: float | torch.Tensor | None = None,
    ):
        """One reverse step; ``anomaly_strength`` is a scalar or ``(B,)`` tensor (default 0).

        The parent draws ``z`` and adds ``sigma_t * z``; we replay the same draw from the same
        generator state and add ``(sqrt(1 + s) - 1) * sigma_t * z``, so the result is
        ``mu + sqrt(1 + s) * sigma_t * z`` and the generators end where the parent left them.
        """
        s = _as_strength(anomaly_strength, sample)
        t = int(timestep)
        adds_noise = t > 0  # the parent's rule: no noise at the last (t = 0) step
        if not (adds_noise and torch.any(s > 0)):
            return super().step(model_output, timestep, sample, generator, return_dict)

        gens = _generator_list(generator, sample.shape[0])
        states = [g.get_state() for g in gens]
        out = super().step(model_output, timestep, sample, generator, return_dict=True)

        c = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * c and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, c, dim=1)
        for g, state in zip(gens, states, strict=True):
            g.set_state(state)
        z = randn_tensor(
            model_output.shape,
            generator=generator,
            device=model_output.device,
            dtype=model_output.dtype,
        )
        sigma = self._sigma(t, predicted_variance)
        prev = out.prev_sample + (torch.sqrt(1 + s) - 1) * sigma * z
        if not return_dict:
            return prev, out.pred_original_sample
        return type(out)(prev_sample=prev, pred_original_sample=out.pred_original_sample)


class SDASDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` plus SDAS's extra ``sqrt(anomaly_strength) * sigma_t * z`` per sample.

    ``sigma_t`` is the model's reverse std: learned range when the model output has twice
    the image channels, else the fixed posterior variance ``beta_tilde_t`` of the respaced
    schedule. ``z`` is each sample's next draw from its own generator: with ``eta > 0`` the
    very draw the parent used for DDIM's noise (replayed), with ``eta = 0`` a draw made only
    for samples with ``s > 0``; either way an ``s = 0`` sample follows the parent exactly.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = True,
        generator: Generators = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        anomaly_strength: float | torch.Tensor | None = None,
    ):
        s = _as_strength(anomaly_strength, sample)
        c = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * c:
            model_output, predicted_variance = torch.split(model_output, c, dim=1)
        t = int(timestep)
        # notation: prev_t is the next (smaller) timestep; prev_t < 0 means this is the last step
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        strong = prev_t >= 0 and bool(torch.any(s > 0))
        given = eta > 0 and variance_noise is not None  # the caller's DDIM noise is z
        replay = strong and eta > 0 and variance_noise is None
        if strong and not given:
            gens = _generator_list(generator, sample.shape[0])
            states = [g.get_state() for g in gens] if replay else None
        out = super().step(
            model_output,
            timestep,
            sample,
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=generator,
            variance_noise=variance_noise,
            return_dict=True,
        )
        prev = out.prev_sample
        if strong:
            alpha_prod_t = self.alphas_cumprod[t]
            alpha_prod_t_prev = self.alphas_cumprod[prev_t]
            if predicted_variance is None:
                sigma = self._get_variance(t, prev_t) ** 0.5
            else:
                log_var = learned_range_log_variance(
                    alpha_prod_t, alpha_prod_t_prev, predicted_variance
                )
                sigma = torch.exp(0.5 * log_var)
            if given:
                z = variance_noise
            elif replay:  # the parent's own draw, leaving the generators where it did
                for g, state in zip(gens, states, strict=True):
                    g.set_state(state)
                z = randn_tensor(
                    prev.shape, generator=generator, device=prev.device, dtype=prev.dtype
                )
            else:
                z = torch.zeros_like(prev)
                for i in torch.nonzero(s.flatten() > 0).flatten().tolist():
                    z[i] = randn_tensor(
                        prev.shape[1:], generator=gens[i], device=prev.device, dtype=prev.dtype
                    )
            prev = prev + torch.sqrt(s) * sigma * z
        if not return_dict:
            return prev, out.pred_original_sample
        return type(out)(prev_sample=prev, pred_original_sample=out.pred_original_sample)
