"""SDAS: strength-controllable diffusion anomaly synthesis as diffusers scheduler subclasses.

RealNet pushes samples off the normal manifold by inflating the reverse-process noise with a
per-sample anomaly strength ``s >= 0`` (``s = 0`` is ordinary sampling):

* DDPM: ``x_{t-1} = mu_theta(x_t, t) + sqrt(1 + s) * sigma_t * z``
* DDIM: ``x_{t-1} = ddim_update(x_t, t, eta) + sqrt(s) * sigma_t * z``

with no noise at the last step; ``s = 0`` is the parent scheduler bit for bit. ``s`` is
called ``anomaly_strength`` because diffusers' ``strength`` means img2img's start fraction.

Each step draws ``z`` once per sample, or takes it ready-made as ``variance_noise`` (the
pipeline draws every step's noise ahead, see :meth:`noise_rows`), so a step never waits on
the host: the previous timestep comes from a host copy of the schedule made in
``set_timesteps`` (diffusers' ``previous_timestep`` searches the device tensor), and a
caller that checked the strengths once on the host passes ``check_strength=False``.

Two choices follow the authors' DDIM (``ddim_sample`` in RealNet's ``gauss_sample.py``):
``eps`` is re-derived from the clipped ``x_0`` (diffusers' ``use_clipped_model_output=True``,
here the default; with ``False`` the two differ only where ``x_0`` was clipped), and ``z`` is
the same draw as DDIM's own ``eta`` noise when ``eta > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None


def _as_strength(
    anomaly_strength: float | torch.Tensor | None, sample: torch.Tensor, check: bool = True
) -> torch.Tensor:
    """Per-sample strength ``(B,)`` broadcastable to ``sample``'s ``(B, C, H, W)``.

    ``check=False`` skips the value check (it reads the tensor on the host): for callers
    that checked the strengths once before the loop.
    """
    b = sample.shape[0]
    if anomaly_strength is None:
        s = torch.zeros(b, dtype=sample.dtype, device=sample.device)
    else:
        s = torch.as_tensor(anomaly_strength, dtype=sample.dtype, device=sample.device)
        s = s.expand(b) if s.ndim == 0 else s
    if s.shape != (b,):
        msg = f"anomaly_strength must be a scalar or have shape ({b},), got {tuple(s.shape)}"
        raise ValueError(msg)
    if check and (torch.any(s < 0) or not torch.all(torch.isfinite(s))):
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


class _HostTimesteps:
    """``set_timesteps`` that also keeps the schedule as Python ints (``timestep_list``)."""

    timestep_list: list[int] | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:
        super().set_timesteps(num_inference_steps, device="cpu", **kwargs)
        self.timestep_list = [int(t) for t in self.timesteps.tolist()]  # a host tensor here
        self._previous = dict(zip(self.timestep_list, [*self.timestep_list[1:], -1], strict=True))
        self.timesteps = self.timesteps.to(device)


class SDASDDPMScheduler(_HostTimesteps, DDPMScheduler):
    """``DDPMScheduler`` whose reverse noise is scaled by ``sqrt(1 + anomaly_strength)`` per sample.

    Works with fixed-variance models and with models that predict variance
    (``variance_type="learned_range"``, output channels = 2 x image channels).
    """

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The next (smaller) timestep of the schedule, from its host copy when ``timestep``
        is a Python int (diffusers' own reads the device tensor)."""
        if isinstance(timestep, int) and self.timestep_list is not None:
            prev = self._previous.get(timestep)
            if prev is not None:
                return prev
        return super().previous_timestep(timestep)

    def noise_rows(self, timestep: int, strengths: Sequence[float], eta: float = 0.0) -> list[int]:
        """The samples whose generators draw ``z`` at this step: all of them while ``t > 0``."""
        return list(range(len(strengths))) if timestep > 0 else []

    def _sigma(self, t: int, predicted_variance: torch.Tensor | None) -> torch.Tensor | float:
        """Reverse std sigma_t, derived from ``_get_variance`` exactly as the parent does."""
        v = self._get_variance(t, predicted_variance=predicted_variance)
        if self.variance_type == "fixed_small_log":
            return v
        if self.variance_type == "learned_range":
            return torch.exp(0.5 * v)
        return v**0.5

    def _posterior_mean(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_theta(x_t, t), predicted x_0): the parent's step without its noise, the same
        operations in the same order (Ho et al. 2020, formulas 15 and 7)."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        elif kind == "sample":
            x0 = model_output
        elif kind == "v_prediction":
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        else:
            msg = f"prediction_type {kind!r} must be one of epsilon, sample or v_prediction"
            raise ValueError(msg)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        return x0_coeff * x0 + xt_coeff * sample, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
        anomaly_strength: float | torch.Tensor | None = None,
        variance_noise: torch.Tensor | None = None,
        check_strength: bool = True,
    ):
        """One reverse step ``mu + sqrt(1 + s) * sigma_t * z``; ``anomaly_strength`` is a scalar
        or ``(B,)`` tensor (default 0).

        ``z`` is ``variance_noise`` (``(B, C, H, W)``) when given, else one draw from
        ``generator`` (one per sample), as the parent draws it. The sum is written
        ``(mu + sigma_t z) + (sqrt(1 + s) - 1) sigma_t z``: the parent's own result plus the
        strength term, so every image sampled before (when the step drew ``z`` twice, the
        second time replaying the first) comes out bit for bit.
        """
        s = _as_strength(anomaly_strength, sample, check=check_strength)
        t = int(timestep)
        c = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * c and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, c, dim=1)
        prev, x0 = self._posterior_mean(model_output, t, sample)
        if t > 0:  # the parent's rule: no noise at the last (t = 0) step
            z = variance_noise
            if z is None:
                if generator is None and check_strength and bool(torch.any(s > 0)):
                    _generator_list(generator, sample.shape[0])  # raises: no generator
                z = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            sigma = self._sigma(t, predicted_variance)
            prev = prev + sigma * z
            prev = prev + (torch.sqrt(1 + s) - 1) * sigma * z
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class SDASDDIMScheduler(_HostTimesteps, DDIMScheduler):
    """``DDIMScheduler`` plus SDAS's extra ``sqrt(anomaly_strength) * sigma_t * z`` per sample.

    ``sigma_t`` is the model's reverse std: learned range when the model output has twice
    the image channels, else the fixed posterior variance ``beta_tilde_t`` of the respaced
    schedule. ``z`` is each sample's next draw from its own generator: with ``eta > 0`` the
    very draw the parent uses for DDIM's noise, with ``eta = 0`` a draw made only for
    samples with ``s > 0``; either way an ``s = 0`` sample follows the parent exactly.
    """

    def noise_rows(self, timestep: int, strengths: Sequence[float], eta: float = 0.0) -> list[int]:
        """The samples whose generators draw ``z`` at this step: all of them when ``eta > 0``
        (DDIM's own noise, drawn at every step), else those with ``s > 0`` before the last."""
        if eta > 0:
            return list(range(len(strengths)))
        prev_t = timestep - self.config.num_train_timesteps // self.num_inference_steps
        return [i for i, s in enumerate(strengths) if s > 0] if prev_t >= 0 else []

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
        check_strength: bool = True,
    ):
        """One DDIM step plus ``sqrt(s) * sigma_t * z``.

        ``variance_noise`` is ``z`` (``(B, C, H, W)``, the rows :meth:`noise_rows` names
        drawn, the others unused), else ``z`` is drawn here from ``generator``.
        """
        s = _as_strength(anomaly_strength, sample, check=check_strength)
        c = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * c:
            model_output, predicted_variance = torch.split(model_output, c, dim=1)
        t = int(timestep)
        # notation: prev_t is the next (smaller) timestep; prev_t < 0 means this is the last step
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        z = variance_noise
        if z is None:
            if eta > 0:  # DDIM's own noise, which the strength term reuses
                z = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            elif prev_t >= 0 and (generator is not None or check_strength):
                # reads s on the host: the pipeline passes variance_noise (or no generator
                # and check_strength=False on a step without strength noise) instead
                rows = self.noise_rows(t, s.flatten().tolist(), eta)
                if rows:
                    gens = _generator_list(generator, sample.shape[0])
                    z = torch.zeros_like(sample)
                    for i in rows:
                        z[i] = randn_tensor(
                            sample.shape[1:], generator=gens[i], device=z.device, dtype=z.dtype
                        )
        out = super().step(
            model_output,
            t,
            sample,
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=None,
            variance_noise=z if eta > 0 else None,
            return_dict=True,
        )
        prev = out.prev_sample
        if prev_t >= 0 and z is not None:
            alpha_prod_t = self.alphas_cumprod[t]
            alpha_prod_t_prev = self.alphas_cumprod[prev_t]
            if predicted_variance is None:
                sigma = self._get_variance(t, prev_t) ** 0.5
            else:
                log_var = learned_range_log_variance(
                    alpha_prod_t, alpha_prod_t_prev, predicted_variance
                )
                sigma = torch.exp(0.5 * log_var)
            prev = prev + torch.sqrt(s) * sigma * z
        if not return_dict:
            return prev, out.pred_original_sample
        return type(out)(prev_sample=prev, pred_original_sample=out.pred_original_sample)
