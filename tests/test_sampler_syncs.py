"""The sampling loop never waits on the host, and drawing the noise ahead changes no image.

* Host syncs: a ``TorchDispatchMode`` counts the operations that would make the host wait
  on a GPU (scalar reads, ``nonzero``, device-to-host copies) while the pipeline samples;
  the count per step is the difference between two runs of different step counts, so the
  fixed few per batch (the strengths and labels going in, the images coming out) cancel.
* Bit identity: the pipeline's images equal, bit for bit, those of the algorithm the
  datasets made so far were sampled with: diffusers' own scheduler step with per-sample
  generators, plus the strength term computed from a replay of the same draw.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from sia_pipeline.diffusion.classifier import NoisyClassifier
from sia_pipeline.diffusion.guidance import ClassifierGuidance
from sia_pipeline.diffusion.model import PRESETS, build_scheduler, build_unet
from sia_pipeline.diffusion.sampler import SDASPipeline, StepNoise
from sia_pipeline.diffusion.sdas import (
    SDASDDIMScheduler,
    SDASDDPMScheduler,
    learned_range_log_variance,
)

SCALAR_READS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose"}


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten calls of this thread that read device data on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SCALAR_READS:
            self.calls[name] = self.calls.get(name, 0) + 1
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst is not None
                and torch.device(dst).type == "cpu"
            ):
                self.calls["device_to_host"] = self.calls.get("device_to_host", 0) + 1
        return func(*args, **kwargs)


def _unet(learn_sigma: bool = False, device: str = "cpu"):
    torch.manual_seed(0)
    return build_unet(PRESETS["test"], num_classes=2, learn_sigma=learn_sigma).eval().to(device)


def _guidance(device: str = "cpu") -> ClassifierGuidance:
    torch.manual_seed(1)
    clf = NoisyClassifier(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=32,
        num_classes=2,
    )
    return ClassifierGuidance(clf.eval().to(device), 2.0)


CASES = {
    "ddpm": ("ddpm", 0.0, False),
    "ddim": ("ddim", 0.0, False),
    "ddim-eta": ("ddim", 0.5, False),
    "guided-ddpm": ("ddpm", 0.0, True),
    "guided-ddim": ("ddim", 0.0, True),
}
LABELS, STRENGTHS, SEEDS = [0, 1, 1, 0], [0.0, 0.3, 0.1, 0.5], [5, 6, 7, 8]


def _pipe(sampler: str, learn_sigma: bool = True, device: str = "cpu") -> SDASPipeline:
    cls = SDASDDPMScheduler if sampler == "ddpm" else SDASDDIMScheduler
    scheduler = cls.from_config(build_scheduler(learn_sigma).config)
    pipe = SDASPipeline(_unet(learn_sigma, device), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_syncs(
    pipe: SDASPipeline, steps: int, eta: float, guidance, strength_min_t: int = 0
) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        pipe(
            LABELS, STRENGTHS, SEEDS, num_inference_steps=steps, eta=eta, guidance=guidance,
            strength_min_t=strength_min_t,
        )  # fmt: skip
    return counter


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_inside_the_step_loop(case):
    sampler, eta, guided = CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = _pipe(sampler, device=device)
    guidance = _guidance(device) if guided else None
    few, more = (count_syncs(pipe, n, eta, guidance) for n in (3, 6))
    per_step = (more.total - few.total) / 3
    print(f"{case} on {device}: {per_step:g} host syncs per step, {few.total} per batch of 3 steps")
    assert per_step == 0, (few.calls, more.calls)
    assert few.total <= 4, few.calls  # the images coming back, nothing per step


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_no_host_sync_with_the_strength_on_the_early_steps_only(sampler, eta):
    """``strength_min_t`` picks each step's strength tensor by the host timestep: 3 and 6
    steps both straddle t = 500, so steps with and without the strength are counted."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = _pipe(sampler, device=device)
    few, more = (count_syncs(pipe, n, eta, None, strength_min_t=500) for n in (3, 6))
    per_step = (more.total - few.total) / 3
    print(f"{sampler} eta {eta} strength_min_t 500 on {device}: {per_step:g} syncs per step")
    assert per_step == 0, (few.calls, more.calls)
    assert few.total <= 4, few.calls


def test_counter_sees_a_scalar_read():
    """The counter is not blind: a step fed a device timestep tensor reads it."""
    sch = SDASDDPMScheduler.from_config(build_scheduler().config)
    sch.set_timesteps(4)
    x = torch.zeros(1, 3, 4, 4)
    with HostSyncCounter() as counter:
        sch.step(x, sch.timesteps[0], x, variance_noise=x, check_strength=False)
    assert counter.calls.get("_local_scalar_dense", 0) >= 1


def _old_loop(unet, cfg, sampler, steps, eta, guidance) -> torch.Tensor:
    """The sampling loop of the datasets made so far: diffusers' step draws each sample's z
    from its generator; an SDAS step replays that draw for the strength term."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS), 3, 32, 32), generator=gens, dtype=unet.dtype)
    labels = torch.tensor(LABELS)
    s = torch.tensor(STRENGTHS).view(-1, 1, 1, 1)
    plain = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(cfg)
    sdas = (SDASDDPMScheduler if sampler == "ddpm" else SDASDDIMScheduler).from_config(cfg)
    plain.set_timesteps(steps)
    sdas.set_timesteps(steps)
    for t in plain.timesteps:
        with torch.no_grad():
            out = unet(x, t, class_labels=labels).sample.float().contiguous()
        ti, states = int(t), [g.get_state() for g in gens]
        pv = out[:, 3:] if out.shape[1] == 6 else None
        if sampler == "ddpm":
            prev = plain.step(out, t, x, generator=gens).prev_sample
            if ti > 0:
                for g, state in zip(gens, states, strict=True):
                    g.set_state(state)
                z = randn_tensor(x.shape, generator=gens)
                prev = prev + (torch.sqrt(1 + s) - 1) * sdas._sigma(ti, pv) * z
        else:
            kw = {"eta": eta, "use_clipped_model_output": True}
            prev = plain.step(out[:, :3], t, x, generator=gens, **kw).prev_sample
            prev_t = ti - 1000 // steps
            if prev_t >= 0:
                if eta > 0:
                    for g, state in zip(gens, states, strict=True):
                        g.set_state(state)
                    z = randn_tensor(x.shape, generator=gens)
                else:
                    z = torch.zeros_like(x)
                    for i in torch.nonzero(s.flatten() > 0).flatten().tolist():
                        z[i] = randn_tensor(x.shape[1:], generator=gens[i])
                a_t, a_prev = sdas.alphas_cumprod[ti], sdas.alphas_cumprod[prev_t]
                sigma = torch.exp(0.5 * learned_range_log_variance(a_t, a_prev, pv))
                prev = prev + torch.sqrt(s) * sigma * z
        if guidance is not None:
            with torch.no_grad():
                prev = prev + guidance.shift(sdas, out, ti, x, labels, eta=eta)
        x = prev
    return x.clamp(-1, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_images_are_those_of_the_old_loop_bit_for_bit(case):
    sampler, eta, guided = CASES[case]
    pipe = _pipe(sampler)
    guidance = _guidance() if guided else None
    got = pipe(
        LABELS, STRENGTHS, SEEDS, num_inference_steps=6, eta=eta, guidance=guidance,
        output_type="pt",
    ).images  # fmt: skip
    want = _old_loop(pipe.unet, pipe.scheduler.config, sampler, 6, eta, guidance)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_prefetched_noise_changes_no_value(sampler, eta):
    pipe = _pipe(sampler, learn_sigma=False)
    kw = {"num_inference_steps": 5, "eta": eta, "output_type": "pt"}
    inline = pipe(LABELS, STRENGTHS, SEEDS, prefetch=False, **kw).images
    ahead = pipe(LABELS, STRENGTHS, SEEDS, prefetch=True, **kw).images
    assert torch.equal(inline, ahead)


def test_step_noise_draws_what_randn_tensor_draws():
    shape = (3, 3, 8, 8)
    plan = [([0, 1, 2], torch.float32), ([], torch.float32), ([1], torch.float32)]
    twins = [torch.Generator().manual_seed(i) for i in range(3)]
    for prefetch in (False, True):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        with StepNoise(gens, shape, plan, torch.device("cpu"), prefetch=prefetch) as noise:
            first, none, third = noise.next(), noise.next(), noise.next()
            with pytest.raises(IndexError):
                noise.next()
        if not prefetch:
            assert torch.equal(first, randn_tensor(shape, generator=twins))
            assert torch.equal(third[1], randn_tensor(shape[1:], generator=twins[1]))
            assert not third[0].any() and not third[2].any()
            want = (first, third)
        assert none is None
        assert torch.equal(first, want[0]) and torch.equal(third, want[1])
