"""Reduced-precision sampling on CPU: bf16 autocast stays close to fp32, and one dtype is
deterministic (same seeds -> same bytes). The GPU speed itself is ``bench/gpu_sampling.py``."""

from __future__ import annotations

import pytest
import torch

from sia_pipeline.diffusion.model import PRESETS, build_scheduler, build_unet, load_model
from sia_pipeline.diffusion.sampler import Sampler, SDASPipeline, make_scheduler, to_uint8

ARGS = ([0, 1], [0.0, 0.3], [1, 2])  # labels, strengths, seeds
KW = {"num_inference_steps": 4, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe() -> SDASPipeline:
    torch.manual_seed(0)
    unet = build_unet(PRESETS["test"], num_classes=2).eval()
    p = SDASPipeline(unet, make_scheduler(build_scheduler().config, "ddpm"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def fp32(pipe) -> torch.Tensor:
    return pipe(*ARGS, **KW).images


def test_bf16_close_to_fp32(pipe, fp32):
    """Tolerance (images in [-1, 1]): mean |diff| < 0.01 and 99th percentile < 0.1 (13 uint8
    levels). Measured on this untrained 32 px model: max 0.137, mean 0.0025, p99 0.028. The
    maximum is not bounded: an untrained model's x0 is clipped hard, and a bf16 rounding
    there can flip a pixel's clipping, which the chain then carries on."""
    bf16 = pipe(*ARGS, precision="bf16", **KW).images
    assert bf16.dtype == torch.float32  # the scheduler maths stay float32
    d = (bf16 - fp32).abs()
    print(f"bf16 vs fp32: max {d.max():.4f} mean {d.mean():.5f} p99 {d.quantile(0.99):.4f}")
    assert d.mean() < 0.01
    assert d.quantile(0.99) < 0.1
    assert d.max() > 0  # autocast really ran in bf16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_dtype_is_deterministic(pipe, fp32, precision):
    a = fp32 if precision == "fp32" else pipe(*ARGS, precision=precision, **KW).images
    b = pipe(*ARGS, precision=precision, **KW).images
    assert to_uint8(a).tobytes() == to_uint8(b).tobytes()
    assert torch.equal(a, b)


def test_channels_last_matches_fp32(fp32):
    torch.manual_seed(0)
    unet = build_unet(PRESETS["test"], num_classes=2).eval()
    p = SDASPipeline(unet, make_scheduler(build_scheduler().config, "ddpm"))
    p.set_progress_bar_config(disable=True)
    p.enable_speedups(channels_last=True)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p(*ARGS, **KW).images, fp32, rtol=0, atol=1e-4)


def test_unknown_precision_rejected(pipe):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        pipe(*ARGS, precision="fp8", **KW)


def test_sampler_records_precision_only_when_reduced(tiny_model):
    m = load_model(tiny_model)
    assert "precision" not in Sampler(m, "ddpm", 2).config()
    assert Sampler(m, "ddpm", 2, precision="bf16").config()["precision"] == "bf16"
