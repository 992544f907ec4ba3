"""Converted ADM UNets and noisy classifiers compute what the authors' networks compute.

The reference side is the authors' own ``UNetModel`` / ``EncoderUNetModel`` on random weights at
realistic scales (``adm_reference.realistic_``), at a reduced width with several heads per
attention layer. The full paper width is measured by ``bench/adm_equality.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from adm_reference import realistic_, reference_models

from sia_pipeline.diffusion import adm
from sia_pipeline.diffusion.adm import ADMArch, CheckpointError
from sia_pipeline.diffusion.classifier import load_classifier, save_classifier
from sia_pipeline.diffusion.convert import adm_to_classifier, adm_to_unet
from sia_pipeline.diffusion.model import ModelError

unets = reference_models()
needs_reference = pytest.mark.skipif(
    unets is None, reason="the authors' code (../shared/reference/realnet-official) is absent"
)

# Reduced width: 3 levels, attention at 2 of them with 2 and 4 heads (16 channels each).
SMALL = ADMArch(
    image_size=32,
    model_channels=32,
    channel_mult=(1, 1, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    num_head_channels=16,
)
QKV_GAIN = 2.0  # mean max attention probability about 0.13 (uniform: 1/64 .. 1/256)
TOL = 1e-4
T = torch.tensor([0, 10, 250, 500, 999])


def _reference_unet(arch: ADMArch, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = unets.UNetModel(
        image_size=arch.image_size,
        in_channels=3,
        model_channels=arch.model_channels,
        out_channels=6 if arch.learn_sigma else 3,
        num_res_blocks=arch.num_res_blocks,
        attention_resolutions=arch.attention_resolutions,
        channel_mult=arch.channel_mult,
        num_classes=num_classes,
        num_head_channels=arch.num_head_channels,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    return realistic_(ref, seed, QKV_GAIN).eval()


def _reference_classifier(arch: ADMArch, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = unets.EncoderUNetModel(
        image_size=arch.image_size,
        in_channels=3,
        model_channels=arch.model_channels,
        out_channels=num_classes,
        num_res_blocks=arch.num_res_blocks,
        attention_resolutions=arch.attention_resolutions,
        channel_mult=arch.channel_mult,
        num_head_channels=arch.num_head_channels,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool="attention",
    )
    return realistic_(ref, seed, QKV_GAIN).eval()


def _x(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).clamp(-1, 1)


@needs_reference
@torch.no_grad()
def test_converted_unet_gives_reference_eps_and_variance():
    ref = _reference_unet(SMALL, num_classes=5)
    unet = adm_to_unet(ref.state_dict(), SMALL, num_classes=5)
    x, y = _x(len(T)), torch.tensor([0, 1, 2, 4, 3])
    a, b = ref(x, T, y), unet(x, T, class_labels=y).sample
    assert a.shape == b.shape == (len(T), 6, 32, 32)
    eps_diff = (a[:, :3] - b[:, :3]).abs().max().item()
    var_diff = (a[:, 3:] - b[:, 3:]).abs().max().item()
    assert eps_diff < TOL and var_diff < TOL, (eps_diff, var_diff)
    assert a.abs().max() > 0.5  # not a trivially small output
    # another label at the same x and t changes the output: the class embedding is live
    assert (unet(x, T, class_labels=(y + 1) % 5).sample - b).abs().max() > 1e-2


@needs_reference
@torch.no_grad()
def test_a_plain_qkv_chunk_would_be_caught(monkeypatch):
    """The weights are sharp enough that the per-head qkv order matters (the known bug)."""
    ref = _reference_unet(SMALL, num_classes=5)
    good = adm._apply

    def plain_chunk(rule, t):
        if rule.op.startswith("qkv"):
            return {n: p.squeeze(-1) for n, p in zip(rule.dst, t.float().chunk(3), strict=True)}
        return good(rule, t)

    monkeypatch.setattr(adm, "_apply", plain_chunk)
    wrong = adm_to_unet(ref.state_dict(), SMALL, num_classes=5)
    x, y = _x(2), torch.tensor([0, 1])
    assert (ref(x, T[:2], y) - wrong(x, T[:2], class_labels=y).sample).abs().max() > 0.1


@needs_reference
@torch.no_grad()
def test_converted_classifier_gives_reference_logits_and_round_trips(tmp_path):
    ref = _reference_classifier(SMALL, num_classes=3)
    clf = adm_to_classifier(ref.state_dict(), SMALL, num_classes=3)
    x = _x(len(T), seed=2)
    a, b = ref(x, T), clf(x, T)
    assert a.shape == b.shape == (len(T), 3)
    assert (a - b).abs().max().item() < TOL
    assert a.std() > 0.1  # logits that differ between inputs
    cats = {"bottle": 0, "cable": 1, "capsule": 2}
    cid = save_classifier(clf, {"categories": cats, "dataset": "mvtec"}, tmp_path / "clf")
    loaded, card = load_classifier(str(tmp_path / "clf"))
    assert card["classifier_id"] == cid and cid.startswith("cls-")
    assert card["categories"] == cats and card["image_size"] == 32 and card["dataset"] == "mvtec"
    assert (loaded(x, T) - a).abs().max().item() < TOL
    assert not any(p.requires_grad for p in loaded.parameters())


@needs_reference
def test_classifier_gradient_flows_to_the_input():
    """Guidance needs d log p(y | x_t) / d x_t."""
    clf = adm_to_classifier(_reference_classifier(SMALL, 3).state_dict(), SMALL, 3)
    clf.requires_grad_(False)
    x = _x(2).requires_grad_(True)
    logp = torch.log_softmax(clf(x, T[:2]), -1)[range(2), torch.tensor([0, 2])].sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert grad.shape == x.shape and grad.abs().max() > 0


def test_load_classifier_refuses_bad_folders(tmp_path):
    with pytest.raises(ModelError, match="classifier folder not found"):
        load_classifier(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a classifier folder: missing config.json"):
        load_classifier(str(tmp_path / "empty"))
    from sia_pipeline.diffusion.classifier import NoisyClassifier

    torch.manual_seed(0)
    clf = NoisyClassifier(
        image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_head_channels=16, num_classes=2,
    )  # fmt: skip
    save_classifier(clf, {"categories": {"a": 0, "b": 1}}, tmp_path / "clf")
    card_path = tmp_path / "clf" / "classifier_card.json"
    card = json.loads(card_path.read_text())
    card["categories"] = {"a": 1, "b": 0}  # swapped labels: a different classifier
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="content hash does not match"):
        load_classifier(str(tmp_path / "clf"))
    with pytest.raises(ValueError, match="do not cover"):
        save_classifier(clf, {"categories": {"a": 0}}, tmp_path / "clf2")


@needs_reference
def test_mismatched_architecture_names_keys_and_option():
    sd = _reference_unet(SMALL, num_classes=5).state_dict()
    wrong_width = ADMArch(**{**SMALL.__dict__, "model_channels": 64})
    with pytest.raises(
        CheckpointError,
        match=r"input_blocks\.0\.0\.bias \(shape \(32,\), expected \(64,\)\).*"
        r"--model-channels should be 32",
    ):
        adm_to_unet(sd, wrong_width, 5)
    wrong_attn = ADMArch(**{**SMALL.__dict__, "attention_resolutions": (4,)})
    with pytest.raises(CheckpointError, match=r"input_blocks\.\d\.1\..*--attention-resolutions"):
        adm_to_unet(sd, wrong_attn, 5)
    wrong_levels = ADMArch(**{**SMALL.__dict__, "channel_mult": (1, 1, 2, 2)})
    with pytest.raises(CheckpointError, match="--channel-mult"):
        adm_to_unet(sd, wrong_levels, 5)
    with pytest.raises(CheckpointError, match="--fixed-sigma|--learn-sigma"):
        adm_to_unet(sd, ADMArch(**{**SMALL.__dict__, "learn_sigma": False}), 5)
    with pytest.raises(CheckpointError, match="has 5 classes"):
        adm_to_unet(sd, SMALL, 15)


# --- sia-convert-adm ------------------------------------------------------------------------

SMALL_OPTS = [
    "--image-size", "32", "--model-channels", "32", "--channel-mult", "1,1,2",
    "--num-res-blocks", "1", "--attention-resolutions", "2,4", "--num-head-channels", "16",
]  # fmt: skip


class _FakeEasyDict(dict):
    """Pickles as the authors' ``easydict.EasyDict`` config (a dict with attributes)."""

    def __init__(self, d=None):
        super().__init__(d or {})
        for k, v in self.items():
            setattr(self, k, v)


_FakeEasyDict.__module__, _FakeEasyDict.__qualname__ = "easydict", "EasyDict"


def _authors_checkpoint(path, state_dict, monkeypatch):
    """Their save: {"epoch", "arch": EasyDict config, "state_dict": DDP 'module.' keys}."""
    import sys
    import types

    fake = types.ModuleType("easydict")
    fake.EasyDict = _FakeEasyDict
    monkeypatch.setitem(sys.modules, "easydict", fake)
    arch = _FakeEasyDict({"unet": _FakeEasyDict({"classifier_width": 32}), "exp_path": "x"})
    sd = {f"module.{k}": v for k, v in state_dict.items()}
    torch.save({"epoch": 240, "arch": arch, "state_dict": sd, "loss": 0.01}, path)


@pytest.fixture(scope="module")
def converted_model(tmp_path_factory):
    """The authors' checkpoint format, converted by the CLI (bottle, magnetic_tile)."""
    if unets is None:
        pytest.skip("the authors' code is absent")
    from click.testing import CliRunner

    from sia_pipeline.cli.convert_adm import main as convert_cli

    tmp = tmp_path_factory.mktemp("convert")
    ckpt = tmp / "ckpt_240.pth.tar"
    with pytest.MonkeyPatch.context() as mp:
        _authors_checkpoint(ckpt, _reference_unet(SMALL, 2).state_dict(), mp)
    res = CliRunner().invoke(
        convert_cli,
        [str(ckpt), "--out", str(tmp / "m"), "--categories", "bottle,magnetic_tile", *SMALL_OPTS],
    )
    assert res.exit_code == 0, res.output
    return ckpt, tmp / "m"


def test_cli_converts_the_authors_format(converted_model):
    from sia_pipeline.diffusion.adm import file_sha256
    from sia_pipeline.diffusion.model import load_model

    ckpt, folder = converted_model
    m = load_model(folder)
    card = m.card
    assert m.categories == {"bottle": 0, "magnetic_tile": 1}
    assert card["source"] == {"file": ckpt.name, "sha256": file_sha256(ckpt)}
    assert card["architecture"]["model_channels"] == 32
    assert card["architecture"]["attention_resolutions"] == [2, 4]
    assert card["variance_type"] == "learned_range" and m.unet.config.out_channels == 6
    ref = _reference_unet(SMALL, 2)
    x, y = _x(2), torch.tensor([1, 0])
    with torch.no_grad():
        diff = (ref(x, T[:2], y) - m.unet(x, T[:2], class_labels=y).sample).abs().max()
    assert diff < TOL


@pytest.mark.slow
def test_converted_model_runs_gen_preview_and_regenerate(converted_model, ray_local, tmp_path):
    from click.testing import CliRunner

    from sia_pipeline.cli.gen import main as gen_cli
    from sia_pipeline.cli.inspect import main as inspect_cli
    from sia_pipeline.cli.preview import main as preview_cli

    _, model = converted_model
    out = tmp_path / "sia"
    args = ["--model", str(model), "--out", str(out), "--workers", "1", "--steps", "3"]
    res = CliRunner().invoke(
        gen_cli, [*args, "--per-category", "2", "--shard-size", "2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    index = json.loads((out / "index.json").read_text())
    assert index["model_ids"] == [json.loads((model / "model_card.json").read_text())["model_id"]]
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(
        preview_cli,
        ["--model", str(model), "--strengths", "0,0.2", "--per-strength", "1", "--steps", "2",
         "--out", str(grid)],
    )  # fmt: skip
    assert res.exit_code == 0 and grid.stat().st_size > 0, res.output
    res = CliRunner().invoke(
        inspect_cli, [str(out), "--regenerate", "bottle-000000-000001", "--model", str(model)]
    )
    assert res.exit_code == 0, res.output
    assert "identical" in res.output.lower()


def _convert(args):
    from click.testing import CliRunner

    from sia_pipeline.cli.convert_adm import main as convert_cli

    return CliRunner().invoke(convert_cli, [str(a) for a in args])


@needs_reference
def test_cli_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    ckpt = tmp_path / "256x256_diffusion.pt"
    torch.save(_reference_unet(SMALL, 5).state_dict(), ckpt)  # a bare state dict, 5 classes
    res = _convert([ckpt, "--out", tmp_path / "m", *SMALL_OPTS])  # --dataset mvtec: 15
    assert res.exit_code == 2 and "has 5 classes" in res.output and "--categories" in res.output
    opts = [*SMALL_OPTS[:-4], "--attention-resolutions", "4", "--num-head-channels", "16"]
    res = _convert([ckpt, "--out", tmp_path / "m", "--categories", "a,b,c,d,e", *opts])
    assert res.exit_code == 2, res.output
    assert "input_blocks.3.1.norm.bias (unexpected)" in res.output
    assert "likely wrong option: --attention-resolutions" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case", ["missing", "text", "pickle", "dir", "empty_dict"])
def test_cli_refuses_what_is_not_a_checkpoint(tmp_path, case):
    path = tmp_path / "ckpt.pt"
    if case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "pickle":  # arbitrary code in a pickle must not run
        import pickle

        path.write_bytes(pickle.dumps(print))
    elif case == "dir":
        path.mkdir()
    elif case == "empty_dict":
        torch.save({}, path)
    res = _convert([path, "--out", tmp_path / "m"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("sia-convert-adm: error: ") and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_non_empty_out_and_reads_the_legacy_format(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep me")
    ckpt = tmp_path / "c.pt"
    torch.save({"a": torch.zeros(1)}, ckpt, _use_new_zipfile_serialization=False)
    res = _convert([ckpt, "--out", tmp_path / "m"])
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert (tmp_path / "m" / "x").read_text() == "keep me"
    res = _convert([ckpt, "--out", tmp_path / "n"])  # legacy file read; then it does not fit
    assert res.exit_code == 2 and "label_emb.weight (missing)" in res.output


@needs_reference
def test_cli_converts_a_classifier(tmp_path):
    ckpt = tmp_path / "256x256_classifier.pt"
    ref = _reference_classifier(SMALL, 3)
    torch.save(ref.state_dict(), ckpt)
    res = _convert([ckpt, "--out", tmp_path / "c", "--kind", "classifier", "--dataset", "btad",
                    *SMALL_OPTS])  # fmt: skip
    assert res.exit_code == 0, res.output
    clf, card = load_classifier(str(tmp_path / "c"))
    assert card["categories"] == {"01": 0, "02": 1, "03": 2} and card["dataset"] == "btad"
    assert res.output.strip().endswith(f"classifier {card['classifier_id']} -> {tmp_path / 'c'}")
    x = _x(2)
    with torch.no_grad():
        assert (clf(x, T[:2]) - ref(x, T[:2])).abs().max() < TOL
    res = _convert([ckpt, "--out", tmp_path / "u", *SMALL_OPTS, "--categories", "a,b,c"])
    assert res.exit_code == 2 and "unconditional" in res.output  # a classifier is not a UNet
