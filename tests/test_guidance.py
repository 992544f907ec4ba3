"""Classifier guidance: one guided SDAS step equals the authors' guided ``p_sample`` and
``ddim_sample`` (RealNet's ``samples/gauss_sample.py``) for the same x, t, noise and label.

Both sides run the authors' own ``UNetModel`` and ``EncoderUNetModel`` with random weights
at realistic scales, so the check depends only on the step maths, not on a converter.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from adm_reference import REFERENCE, realistic_, reference_models
from click.testing import CliRunner
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from generated_dataset import TINY_MODEL_CATEGORIES, small_spec
from torch import nn

from sia_pipeline.diffusion.guidance import (
    ClassifierGuidance,
    GuidanceError,
    check_categories,
    check_scale,
)
from sia_pipeline.diffusion.model import build_scheduler
from sia_pipeline.diffusion.sampler import SDASPipeline
from sia_pipeline.diffusion.sdas import SDASDDIMScheduler, SDASDDPMScheduler

STEPS = 20  # the authors' sample.yaml: section_counts ddim20
B, NUM_CLASSES, SIZE = 3, 3, 16
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    """The authors' ``unets`` and ``spaced_sample`` modules (torch and numpy only)."""
    unets = reference_models()
    if unets is None or not (REFERENCE / "samples" / "spaced_sample.py").is_file():
        pytest.skip(f"the authors' reference code is absent ({REFERENCE})")
    return SimpleNamespace(unets=unets, spaced=importlib.import_module("samples.spaced_sample"))


@pytest.fixture(scope="module")
def nets(ref):
    """The authors' UNet (learned sigma) and noisy classifier (attention pool), 32 px."""
    torch.manual_seed(0)
    common = {
        "image_size": SIZE,
        "in_channels": 3,
        "model_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": [2],
        "channel_mult": (1, 2),
        "num_head_channels": 16,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    }
    unet = ref.unets.UNetModel(out_channels=6, num_classes=NUM_CLASSES, **common)
    clf = ref.unets.EncoderUNetModel(out_channels=NUM_CLASSES, pool="attention", **common)
    return realistic_(unet, 1).eval(), realistic_(clf, 2).eval()


class _AsDiffusersUNet(nn.Module):
    """The authors' UNet behind diffusers' call convention ``unet(x, t, class_labels).sample``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet

    def forward(self, x, t, class_labels=None):
        ts = torch.as_tensor(t).long().reshape(-1).expand(x.shape[0])
        return SimpleNamespace(sample=self.inner(x, ts, y=class_labels))


def _cond_fn(classifier, scale):
    """The authors' ``cond_fn`` of ``sample.py``."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, SIZE, SIZE, generator=g)
    labels = torch.tensor([0, 2, 1])
    return x, labels


def _ours(nets, scheduler, x, labels, k, s, scale, eta=0.0):
    """Our step k of STEPS (pipeline.denoise_step) and the noise z it drew."""
    unet, clf = nets
    pipe = SDASPipeline(_AsDiffusersUNet(unet), scheduler)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[k]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    twins = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    z = randn_tensor(x.shape, generator=twins)  # what each sample's generator draws next
    guidance = ClassifierGuidance(clf, scale) if scale is not None else None
    strength = torch.full((B,), s)
    with torch.no_grad():
        got = pipe.denoise_step(x, t, labels, gens, strength, eta=eta, guidance=guidance)
    return got, z


def _theirs(ref, nets, method, x, labels, k, s, scale, z, monkeypatch, **kw):
    unet, clf = nets
    diffusion = ref.spaced.SpacedDiffusionBeatGans(
        T=1000, section_counts=f"ddim{STEPS}", beta_scheduler="linear"
    )
    t = torch.full((B,), STEPS - 1 - k, dtype=torch.long)  # their spaced index
    monkeypatch.setattr(torch, "randn_like", lambda _x: z.clone())
    cond_fn = _cond_fn(clf, scale) if scale is not None else None
    with torch.no_grad():
        out = getattr(diffusion, method)(
            unet, x, t, cond_fn=cond_fn, model_kwargs={"y": labels}, s=s, **kw
        )
    monkeypatch.undo()
    return out["sample"]


@pytest.mark.parametrize("k", [0, 9, STEPS - 1])  # first, a middle and the final step
def test_guided_ddpm_step_equals_authors_p_sample(ref, nets, k, monkeypatch):
    x, labels = _inputs(k)
    sch = SDASDDPMScheduler.from_config(build_scheduler(learn_sigma=True).config)
    s, scale = 0.15, 3.0
    got, z = _ours(nets, sch, x, labels, k, s, scale)
    want = _theirs(ref, nets, "p_sample", x, labels, k, s, scale, z, monkeypatch)
    diff = (got - want).abs().max().item()
    print(f"DDPM step {k}: max |ours - authors'| = {diff:.2e}")
    assert diff < ATOL
    # not vacuous: guidance moved the step by more than the tolerance (at the final step
    # Sigma_t ~ 1e-4 makes the shift small, but diffusers' 1e-20 clamp would make it ~0)
    unguided, _ = _ours(nets, sch, x, labels, k, s, None)
    assert (got - unguided).abs().max() > (1e-3 if k < STEPS - 1 else 2 * ATOL)


@pytest.mark.parametrize(("k", "eta"), [(0, 0.0), (9, 0.0), (STEPS - 1, 0.0), (9, 0.5)])
def test_guided_ddim_step_equals_authors_ddim_sample(ref, nets, k, eta, monkeypatch):
    x, labels = _inputs(10 + k)
    sch = SDASDDIMScheduler.from_config(build_scheduler(learn_sigma=True).config)
    s, scale = 0.02, 3.0  # the authors' DDIM range of s is [0.01, 0.03]
    got, z = _ours(nets, sch, x, labels, k, s, scale, eta=eta)
    want = _theirs(ref, nets, "ddim_sample", x, labels, k, s, scale, z, monkeypatch, eta=eta)
    diff = (got - want).abs().max().item()
    print(f"DDIM step {k} eta {eta}: max |ours - authors'| = {diff:.2e}")
    assert diff < ATOL
    unguided, _ = _ours(nets, sch, x, labels, k, s, None, eta=eta)
    assert (got - unguided).abs().max() > (1e-3 if k < STEPS - 1 else 2 * ATOL)


@pytest.mark.parametrize("k", [0, 9])
def test_unguided_steps_equal_authors(ref, nets, k, monkeypatch):
    """Without a classifier both samplers are the authors' (DDIM re-derives eps from the
    clipped x0, which these early, heavily clipped steps exercise)."""
    x, labels = _inputs(20 + k)
    for cls, method, s in (
        (SDASDDPMScheduler, "p_sample", 0.2),
        (SDASDDIMScheduler, "ddim_sample", 0.03),
    ):
        sch = cls.from_config(build_scheduler(learn_sigma=True).config)
        got, z = _ours(nets, sch, x, labels, k, s, None)
        want = _theirs(ref, nets, method, x, labels, k, s, None, z, monkeypatch)
        assert (got - want).abs().max().item() < ATOL


def test_ddim_differs_from_diffusers_default_only_where_x0_is_clipped():
    """Our DDIM re-derives eps from the clipped x0 (the authors' rule, diffusers'
    ``use_clipped_model_output=True``); diffusers' default keeps the raw eps. With s = 0 the
    two agree wherever x0 stays in [-1, 1] and differ only where it was clipped."""
    config = build_scheduler().config
    ours, plain = SDASDDIMScheduler.from_config(config), DDIMScheduler.from_config(config)
    for sch in (ours, plain):
        sch.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    t = int(ours.timesteps[15])  # low noise: x0 ~ x
    x = torch.rand(2, 3, 8, 8, generator=g) - 0.5
    eps = 0.05 * torch.randn(2, 3, 8, 8, generator=g)
    eps[1] = 8.0 * torch.randn(3, 8, 8, generator=g)  # sample 1: x0 far outside [-1, 1]
    a = ours.step(eps, t, x).prev_sample
    b = plain.step(eps, t, x).prev_sample
    c = plain.step(eps, t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)  # the maths agree
    a0 = ours.step(eps, t, x).pred_original_sample
    clipped = (
        (x - (1 - ours.alphas_cumprod[t]).sqrt() * eps) / ours.alphas_cumprod[t].sqrt()
    ).abs() > 1
    assert not clipped[0].any() and clipped[1].any()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)  # nothing clipped: equal
    assert (a[1] - b[1])[clipped[1]].abs().max() > 1e-2  # clipped: diffusers' default differs
    assert a0.abs().max() <= 1


class _Linear(nn.Module):
    """logits = W @ x.flatten() + b: its guidance gradient is known in closed form."""

    def __init__(self, n_in: int, n_cls: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(n_cls, n_in, generator=g) * 0.05)
        self.b = nn.Parameter(torch.zeros(n_cls))
        self.seen_t = None

    def forward(self, x, t):
        self.seen_t = t
        return x.flatten(1) @ self.w.T + self.b


def test_gradient_is_scaled_grad_log_softmax():
    x = torch.randn(2, 3, 4, 4)
    clf = _Linear(48, 5)
    labels = torch.tensor([1, 4])
    g = ClassifierGuidance(clf, scale=2.5).gradient(x, torch.tensor(700), labels)
    assert clf.seen_t.tolist() == [700, 700] and clf.seen_t.dtype == torch.long
    p = torch.softmax(clf(x, None), dim=-1).detach()
    expect = 2.5 * (clf.w[labels] - p @ clf.w).detach().view(2, 3, 4, 4)
    torch.testing.assert_close(g, expect, rtol=1e-5, atol=1e-6)
    zero = ClassifierGuidance(clf, scale=0.0).gradient(x, 700, labels)
    assert zero.abs().max() == 0


def test_guidance_raises_the_class_probability():
    """A full guided DDIM loop (a linear classifier, fixed-variance toy UNet) ends with
    higher classifier confidence in the guided class than the unguided loop."""
    from sia_pipeline.diffusion.model import PRESETS, build_unet

    torch.manual_seed(0)
    unet = build_unet(PRESETS["test"], num_classes=2).eval()
    clf = _Linear(3 * 32 * 32, 2)
    pipe = SDASPipeline(unet, SDASDDIMScheduler.from_config(build_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "output_type": "pt"}
    args = ([0, 1], [0.0, 0.0], [5, 6])
    plain = pipe(*args, **kw).images
    guided = pipe(*args, guidance=ClassifierGuidance(clf, 50.0), **kw).images
    labels = torch.tensor([0, 1])

    def p_true(img):
        return torch.softmax(clf(img, None), -1)[torch.arange(2), labels]

    assert torch.all(p_true(guided) > p_true(plain))


def test_check_scale_and_categories():
    assert check_scale(0) == 0.0
    assert check_scale("1.5") == 1.5
    for bad in (-0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(GuidanceError, match="--classifier-scale"):
            check_scale(bad)
    check_categories({"a": 0, "b": 1}, {"b": 1, "a": 0})
    with pytest.raises(GuidanceError, match="missing b; extra c"):
        check_categories({"a": 0, "b": 1}, {"a": 0, "c": 1})
    with pytest.raises(GuidanceError, match=r"other class ids for a \(1 != 0\)"):
        check_categories({"a": 0, "b": 1}, {"a": 1, "b": 0})


# --- the spec, sia-gen, sia-preview and sia-inspect --regenerate ------------------------


def test_spec_records_guidance_and_precision_only_when_used():
    from sia_pipeline.format.genspec import PlanError, sample_params
    from sia_pipeline.gen.plan import make_tasks

    plain = small_spec()
    d = plain.to_dict()
    assert not {"classifier_id", "classifier_scale", "precision"} & set(d)
    assert small_spec(classifier_scale=7.0).spec_hash == plain.spec_hash  # no classifier: ignored
    guided = small_spec(classifier_id="cls-1", classifier_scale=2.0)
    assert guided.to_dict()["classifier_id"] == "cls-1"
    assert guided.to_dict()["classifier_scale"] == 2.0
    hashes = {
        plain.spec_hash,
        guided.spec_hash,
        small_spec(classifier_id="cls-1", classifier_scale=3.0).spec_hash,
        small_spec(classifier_id="cls-2", classifier_scale=2.0).spec_hash,
        small_spec(precision="bf16").spec_hash,
    }
    assert len(hashes) == 5
    # the same noise: seeds and strengths do not depend on guidance or precision
    assert sample_params(guided, "bottle", 3) == sample_params(plain, "bottle", 3)
    row = make_tasks(guided)[0].sample_row(0)
    assert (row["classifier_id"], row["classifier_scale"]) == ("cls-1", 2.0)
    assert "precision" not in row and "classifier_id" not in make_tasks(plain)[0].sample_row(0)
    assert make_tasks(small_spec(precision="bf16"))[0].sample_row(0)["precision"] == "bf16"
    for bad, needle in (
        ({"precision": "fp8"}, "--precision"),
        ({"classifier_scale": -1.0}, "--classifier-scale"),
        ({"classifier_scale": float("nan")}, "--classifier-scale"),
    ):
        with pytest.raises(PlanError, match=needle):
            small_spec(**bad)


def _save_classifier(folder, categories, seed=0):
    from sia_pipeline.diffusion.classifier import NoisyClassifier, save_classifier

    torch.manual_seed(seed)
    clf = NoisyClassifier(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=32,
        num_classes=len(categories),
    )
    return save_classifier(clf, {"categories": categories}, folder)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clf") / "tiny"
    _save_classifier(folder, TINY_MODEL_CATEGORIES)
    return folder


@pytest.fixture(scope="module")
def wrong_classifiers(tmp_path_factory):
    base = tmp_path_factory.mktemp("clf-wrong")
    _save_classifier(base / "other", {"bottle": 0, "screw": 1})
    _save_classifier(base / "swapped", {"bottle": 1, "magnetic_tile": 0})
    return base


def _bad_guidance_cases(tiny_classifier, wrong_classifiers, tmp_path):
    return [
        (["--classifier", str(wrong_classifiers / "other")], "missing magnetic_tile; extra screw"),
        (["--classifier", str(wrong_classifiers / "swapped")], "other class ids"),
        (["--classifier", str(tmp_path / "nope")], "nope: no such folder"),
        (["--classifier", str(tiny_classifier), "--classifier-scale=-1"], "--classifier-scale"),
        (["--classifier", str(tiny_classifier), "--classifier-scale", "nan"], "--classifier-scale"),
        (["--precision", "fp8"], "fp8"),
    ]


def _assert_one_line_exit_2(result, prog: str, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    if needle == "fp8":  # click's own choice error
        assert "Invalid value for '--precision'" in result.stderr
        return
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert needle in lines[0]


def test_sia_gen_bad_guidance_exits_2_and_creates_nothing(
    tiny_model, tiny_classifier, wrong_classifiers, tmp_path
):
    from sia_pipeline.cli.gen import main

    for extra, needle in _bad_guidance_cases(tiny_classifier, wrong_classifiers, tmp_path):
        out = tmp_path / "out"
        args = ["--model", str(tiny_model), "--out", str(out), *extra]
        _assert_one_line_exit_2(CliRunner().invoke(main, args), "sia-gen", needle)
        assert not out.exists()


def test_sia_preview_guided_and_bad_guidance(
    tiny_model, tiny_classifier, wrong_classifiers, tmp_path
):
    from sia_pipeline.cli.preview import main

    base = ["--model", str(tiny_model), "--strengths", "0,0.3", "--per-strength", "1"]
    base += ["--steps", "2"]
    for extra, needle in _bad_guidance_cases(tiny_classifier, wrong_classifiers, tmp_path):
        out = tmp_path / "bad.png"
        result = CliRunner().invoke(main, [*base, "--out", str(out), *extra])
        _assert_one_line_exit_2(result, "sia-preview", needle)
        assert not out.exists()
    out = tmp_path / "bad.png"
    result = CliRunner().invoke(main, [*base, "--out", str(out), "--device", "gpu"])
    _assert_one_line_exit_2(result, "sia-preview", "is not a torch device")
    assert not out.exists()
    out = tmp_path / "guided.png"
    args = [*base, "--out", str(out), "--classifier", str(tiny_classifier)]
    result = CliRunner().invoke(main, [*args, "--classifier-scale", "5", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_sia_gen_guided_end_to_end_and_regenerate(tiny_model, tiny_classifier, tmp_path, ray_local):
    """A guided bf16 dataset records its classifier and precision, its images differ from the
    unguided ones of the same seeds, and sia-inspect --regenerate re-makes a key exactly."""
    from sia_pipeline.cli.gen import main as gen_main
    from sia_pipeline.cli.inspect import main as inspect_main
    from sia_pipeline.diffusion.classifier import load_classifier
    from sia_pipeline.diffusion.model import load_model
    from sia_pipeline.diffusion.sampler import Sampler
    from sia_pipeline.format.v1 import decode_image
    from sia_pipeline.io.storage import open_storage
    from sia_pipeline.publish.inspection import find_sample

    out = tmp_path / "guided"
    args = ["--model", str(tiny_model), "--out", str(out), "--categories", "bottle"]
    args += ["--per-category", "2", "--shard-size", "2", "--batch-size", "2", "--steps", "2"]
    args += ["--workers", "1", "--no-progress", "--precision", "bf16"]
    args += ["--classifier", str(tiny_classifier), "--classifier-scale", "20"]
    result = CliRunner().invoke(gen_main, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    cid = load_classifier(str(tiny_classifier))[1]["classifier_id"]
    assert index["spec"]["classifier_id"] == cid
    assert index["spec"]["classifier_scale"] == 20.0
    assert index["spec"]["precision"] == "bf16"
    assert index["classifier"]["source"] == f"file://{tiny_classifier.resolve()}"
    assert f"--classifier={tiny_classifier}" in index["command"]
    key = "bottle-000000-000001"
    sample = find_sample(open_storage(str(out)), key)
    assert sample.meta["classifier_id"] == cid and sample.meta["precision"] == "bf16"
    unguided = Sampler(load_model(tiny_model), "ddpm", 2, precision="bf16").sample(
        ["bottle"], [sample.meta["strength"]], [sample.meta["seed"]]
    )[0]
    assert (decode_image(sample.image).astype(int) - unguided).any()  # guidance took effect

    res = CliRunner().invoke(inspect_main, [str(out), "--regenerate", key])
    assert res.exit_code == 0, res.output
    assert "bit-identical" in res.output
