"""``--strength-min-t T``: the SDAS strength term only on steps whose timestep t >= T.

A departure from the paper (RealNet applies s on every step), made because the late,
low-noise steps turn s into grain (``bench/results/sia_strength_structure.md``). T = 0 is
the paper bit for bit, and the spec of such a dataset hashes as before; T above every
timestep is s = 0; in between, exactly the steps below T see a zero strength.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from generated_dataset import small_spec

from sia_pipeline.diffusion.model import PRESETS, build_scheduler, build_unet, load_model
from sia_pipeline.diffusion.sampler import Sampler, SDASPipeline, make_scheduler

LABELS, STRENGTHS, SEEDS = [0, 1, 1], [0.3, 0.5, 0.2], [5, 6, 7]
STEPS = 5  # timesteps 800, 600, 400, 200, 0
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(PRESETS["test"], num_classes=2, learn_sigma=True).eval()


def _pipe(unet, sampler: str) -> SDASPipeline:
    pipe = SDASPipeline(unet, make_scheduler(build_scheduler(learn_sigma=True).config, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, eta, strengths=STRENGTHS, **kw) -> torch.Tensor:
    kw = {"num_inference_steps": STEPS, "eta": eta, "output_type": "pt", **kw}
    return pipe(LABELS, strengths, SEEDS, **kw).images


def _hand_loop(pipe, eta: float, min_t: int) -> torch.Tensor:
    """The strength switched by hand: the pipeline's own ``denoise_step`` fed the strengths
    on steps t >= min_t and zeros below, each step drawing from the per-sample generators."""
    from diffusers.utils.torch_utils import randn_tensor

    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    shape = (len(SEEDS), 3, 32, 32)
    labels = torch.tensor(LABELS)
    on, off = torch.tensor(STRENGTHS), torch.zeros(len(STRENGTHS))
    with torch.no_grad():
        x = randn_tensor(shape, generator=gens, dtype=pipe.unet.dtype)
        pipe.scheduler.set_timesteps(STEPS)
        for t in pipe.scheduler.timestep_list:
            x = pipe.denoise_step(x, t, labels, gens, on if t >= min_t else off, eta=eta)
    return x.clamp(-1, 1)


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_zero_is_the_paper_bit_for_bit(unet, sampler, eta):
    pipe = _pipe(unet, sampler)
    assert torch.equal(_sample(pipe, eta, strength_min_t=0), _sample(pipe, eta))


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_above_every_timestep_is_strength_zero(unet, sampler, eta):
    pipe = _pipe(unet, sampler)
    plain = _sample(pipe, eta, strengths=[0.0] * len(STRENGTHS))
    assert torch.equal(_sample(pipe, eta, strength_min_t=801), plain)
    assert torch.equal(_sample(pipe, eta, strength_min_t=999), plain)


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_between_only_the_later_steps_lose_the_strength(unet, sampler, eta, monkeypatch):
    pipe = _pipe(unet, sampler)
    every = _sample(pipe, eta)
    none = _sample(pipe, eta, strengths=[0.0] * len(STRENGTHS))
    seen: list[tuple[int, list[float]]] = []
    step = pipe.scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        seen.append((int(timestep), kwargs["anomaly_strength"].tolist()))
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    got = _sample(pipe, eta, strength_min_t=400)
    monkeypatch.undo()
    s = [float(torch.tensor(v)) for v in STRENGTHS]  # as the device tensor holds them
    assert seen == [(800, s), (600, s), (400, s), (200, [0.0] * 3), (0, [0.0] * 3)]
    assert not torch.equal(got, every) and not torch.equal(got, none)
    assert torch.equal(got, _hand_loop(pipe, eta, 400))


def test_sampler_takes_records_and_bounds_it(tiny_model):
    m = load_model(tiny_model)
    assert "strength_min_t" not in Sampler(m, "ddpm", 2).config()
    assert Sampler(m, "ddpm", 2, strength_min_t=300).config()["strength_min_t"] == 300
    for bad in (-1, 1000, 2.5, True):
        with pytest.raises(ValueError, match=r"strength_min_t must be an int in \[0, 1000\)"):
            Sampler(m, "ddpm", 2, strength_min_t=bad)


def test_spec_hash_unchanged_at_zero_and_changed_above():
    from sia_pipeline.format.genspec import PlanError, sample_params
    from sia_pipeline.format.schema import SPEC, SchemaError, validate
    from sia_pipeline.gen.options import DATASET
    from sia_pipeline.gen.plan import describe_plan, make_tasks
    from sia_pipeline.gen.provenance import command_line

    # The hashes these specs had before the option existed (computed on the code before it):
    # 0 is the paper's sampling, and specs made so before keep their hash.
    paper = small_spec(strength_min_t=0)
    assert paper.spec_hash == "48dc6265dd7f3d0c"
    ddim = {"sampler": "ddim", "eta": 0.5, "precision": "bf16"}
    assert small_spec(**ddim, strength_min_t=0).spec_hash == "a72128aeca1dc78d"
    assert "strength_min_t" not in paper.to_dict()
    assert "strength_min_t" not in make_tasks(paper)[0].sample_row(0)
    assert "--strength-min-t" not in command_line(paper, "out", None, 2)
    # sia-gen's default departs from it (bench/results/realnet_quality-sia-t500.md)
    default = small_spec()
    assert default.strength_min_t == DATASET.strength_min_t == 500
    assert default.to_dict()["strength_min_t"] == 500
    assert "--strength-min-t=500" in command_line(default, "out", None, 2)

    late = small_spec(strength_min_t=300)
    assert late.to_dict()["strength_min_t"] == 300
    assert len({late.spec_hash, small_spec(strength_min_t=301).spec_hash, paper.spec_hash}) == 3
    validate(late.to_dict(), SPEC, "spec.json", SchemaError)
    # the same noise: seeds and strengths do not depend on it
    assert sample_params(late, "bottle", 3) == sample_params(paper, "bottle", 3)
    assert make_tasks(late)[0].sample_row(0)["strength_min_t"] == 300
    assert "--strength-min-t=300" in command_line(late, "out", None, 2)
    assert "t >= 300 only" in describe_plan(late, make_tasks(late))
    for bad in (-1, 1000):
        with pytest.raises(PlanError, match=r"--strength-min-t must be in \[0, 1000\)"):
            small_spec(strength_min_t=bad)
    assert small_spec(strength_min_t=3999, max_steps=4000).strength_min_t == 3999
    for bad in (-1, "300", 1.5, 10**6):
        with pytest.raises(SchemaError, match="strength_min_t"):
            validate({**late.to_dict(), "strength_min_t": bad}, SPEC, "spec.json", SchemaError)


def test_card_says_it_only_when_used():
    from sia_pipeline.format.card import render_card, strength_bins

    index = {"num_samples": 1, "num_shards": 1, "format_version": 1, "strength_min": 0.1}
    index |= {"strength_max": 0.1, "categories": {"bottle": {}}}
    for spec, said in (({}, False), ({"sampler": "ddpm"}, False), ({"strength_min_t": 300}, True)):
        text = render_card({**index, "spec": spec}, {"bottle": [1]}, strength_bins([0.1]), None)
        assert ("t >= 300 only (a departure from the paper" in text) == said, spec


def _one_line_exit_2(result, prog: str, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert needle in lines[0], lines[0]


def test_bad_values_exit_2_on_one_line(tiny_model, tmp_path):
    from sia_pipeline.cli.gen import main as gen_main
    from sia_pipeline.cli.preview import main as preview_main

    out = tmp_path / "out"
    for value, needle in (
        ("-1", "--strength-min-t"),
        ("abc", "--strength-min-t"),
        ("100001", "--strength-min-t"),
        ("1000", "--strength-min-t must be in [0, 1000)"),  # the model's T, at plan time
    ):
        args = ["--model", str(tiny_model), "--out", str(out), "--strength-min-t", value]
        _one_line_exit_2(CliRunner().invoke(gen_main, args), "sia-gen", needle)
        assert not out.exists()
        png = tmp_path / "p.png"
        args = ["--model", str(tiny_model), "--out", str(png), "--strength-min-t", value]
        args += ["--per-strength", "1", "--steps", "2"]
        _one_line_exit_2(CliRunner().invoke(preview_main, args), "sia-preview", needle[:16])
        assert not png.exists()


def test_sia_gen_writes_and_regenerates_it(tiny_model, tmp_path, ray_local):
    """A dataset made with --strength-min-t records it (spec, samples, command, card), its
    images differ from those with the strength on every step, and sia-inspect --regenerate
    re-makes a key bit for bit; sia-preview takes the option too."""
    from sia_pipeline.cli.gen import main as gen_main
    from sia_pipeline.cli.inspect import main as inspect_main
    from sia_pipeline.cli.preview import main as preview_main
    from sia_pipeline.format.v1 import decode_image
    from sia_pipeline.io.storage import open_storage
    from sia_pipeline.publish.inspection import find_sample

    out = tmp_path / "late"
    args = ["--model", str(tiny_model), "--out", str(out), "--categories", "bottle"]
    args += ["--per-category", "2", "--shard-size", "2", "--batch-size", "2", "--steps", "4"]
    args += ["--strengths", "0.5:0.9", "--workers", "1", "--no-progress"]
    result = CliRunner().invoke(gen_main, [*args, "--strength-min-t", "600"])  # only t = 750
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["spec"]["strength_min_t"] == 600
    assert json.loads((out / "spec.json").read_text())["spec"]["strength_min_t"] == 600
    assert "--strength-min-t=600" in index["command"]
    assert "t >= 600 only" in (out / "README.md").read_text()
    key = "bottle-000000-000001"
    sample = find_sample(open_storage(str(out)), key)
    assert sample.meta["strength_min_t"] == 600
    every_step = Sampler(load_model(tiny_model), "ddpm", 4).sample(
        ["bottle"], [sample.meta["strength"]], [sample.meta["seed"]]
    )[0]
    assert (decode_image(sample.image).astype(int) - every_step).any()  # the option took effect

    res = CliRunner().invoke(inspect_main, [str(out), "--regenerate", key])
    assert res.exit_code == 0, res.output
    assert f"{key}: bit-identical: image and metadata" in res.output

    png = tmp_path / "preview.png"
    args = ["--model", str(tiny_model), "--out", str(png), "--per-strength", "1", "--steps", "2"]
    result = CliRunner().invoke(preview_main, [*args, "--strength-min-t", "600"])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0
