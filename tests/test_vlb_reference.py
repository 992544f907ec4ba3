"""The hybrid loss's variational term against the authors' ``_vb_terms_bpd`` (guided-diffusion's,
in ``samples/gauss_sample.py`` of their code): same model output in, same bits/dim out, at
every kind of timestep, t = 0 (the decoder NLL) included."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from adm_reference import REFERENCE

from sia_pipeline.diffusion.losses import vlb_term
from sia_pipeline.diffusion.model import build_scheduler


@pytest.fixture(scope="module")
def reference_diffusion():
    if not (REFERENCE / "samples" / "gauss_sample.py").is_file():
        pytest.skip(f"the authors' code is not at {REFERENCE}")
    if str(REFERENCE) not in sys.path:
        sys.path.insert(0, str(REFERENCE))
    gauss = importlib.import_module("samples.gauss_sample")
    return gauss.GaussianDiffusionBeatGans(np.linspace(1e-4, 0.02, 1000))  # linear, T = 1000


@pytest.mark.parametrize("v_scale", [0.5, 2.0])  # learned_range v inside and beyond [-1, 1]
def test_vlb_equals_reference(reference_diffusion, v_scale):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 0, 1, 2, 10, 250, 500, 999])
    x0 = torch.rand((len(t), 3, 8, 8), generator=g) * 2 - 1
    x0[0, 0, 0] = -1.0  # the decoder's edge bins
    x0[1, 0, 0] = 1.0
    noise = torch.randn(x0.shape, generator=g)
    alphas = build_scheduler(True).alphas_cumprod
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g)  # an imperfect prediction
    v = v_scale * (torch.rand(x0.shape, generator=g) * 2 - 1)
    out = torch.cat([eps, v], dim=1)

    ours = vlb_term(alphas, x0, xt, t, eps, v)
    ref = reference_diffusion._vb_terms_bpd(
        lambda *args, **kw: out.double(), x0.double(), xt.double(), t, clip_denoised=False
    )["output"]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, rtol=2e-3, atol=1e-5)
