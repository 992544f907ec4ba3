"""Improved-DDPM variational bound term, for models that learn their reverse variance.

RealNet's official SDAS models predict ``learned_range`` variances and were trained with
``L_hybrid = L_simple + L_vlb`` (Nichol & Dhariwal 2021, as in guided-diffusion). ``L_vlb``
trains only the variance head: the mean enters it with a stopped gradient.
"""

from __future__ import annotations

import math

import torch


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of 8-bit images in [-1, 1] under a discretised Gaussian decoder."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
        ),
    )
    return log_probs


def vlb_term(
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    eps_pred: torch.Tensor,
    var_pred: torch.Tensor,
) -> torch.Tensor:
    """Per-sample ``L_vlb`` in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
    the decoder NLL at t = 0.

    Args:
        alphas_cumprod: (T,) cumulative alphas of the training schedule.
        x0, xt, eps_pred, var_pred: (B, C, H, W); ``var_pred`` in [-1, 1] is learned_range's v.
        t: (B,) integer timesteps.
    """
    shape = (-1, 1, 1, 1)
    a_t = alphas_cumprod[t].view(shape)
    a_prev = torch.where(
        t > 0, alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(t, dtype=alphas_cumprod.dtype)
    ).view(shape)
    beta_t = 1 - a_t / a_prev
    post_var = beta_t * (1 - a_prev) / (1 - a_t)
    # guided-diffusion clips the t = 0 posterior variance to the t = 1 value,
    # beta_1 (1 - abar_0) / (1 - abar_1) with beta_1 = 1 - abar_1 / abar_0
    post_var_1 = (
        (1 - alphas_cumprod[1] / alphas_cumprod[0])
        * (1 - alphas_cumprod[0])
        / (1 - alphas_cumprod[1])
    )
    post_logvar = torch.log(torch.where(t.view(shape) == 0, post_var_1, post_var))
    coef_x0 = beta_t * a_prev.sqrt() / (1 - a_t)
    coef_xt = (1 - a_prev) * (a_t / a_prev).sqrt() / (1 - a_t)
    true_mean = coef_x0 * x0 + coef_xt * xt

    x0_pred = (xt - (1 - a_t).sqrt() * eps_pred.detach()) / a_t.sqrt()
    model_mean = coef_x0 * x0_pred + coef_xt * xt
    frac = (var_pred + 1) / 2
    model_logvar = frac * torch.log(beta_t) + (1 - frac) * post_logvar

    kl = _normal_kl(true_mean, post_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3))
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    nll = nll.mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)
