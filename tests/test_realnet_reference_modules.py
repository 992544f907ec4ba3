"""Our RealNet modules against the authors' (``../shared/reference/realnet-official``).

Same random features, same random weights (theirs loaded into ours), same outputs: the
reconstruction UNet, RRS (non-affine BatchNorm ranking, top-k by max and by mean) with the
segmentation decoder, AFS channel selection fitted over several batches, the two losses and
the image score. Their code is imported only here, and the tests skip when it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from _reference import REFERENCE

from realnet_train.model.afs import AFS, channel_mask_errors
from realnet_train.model.head import SegmentationHead
from realnet_train.model.realnet import RealNetOutput, image_scores, realnet_losses
from realnet_train.model.reconstruction import ReconstructionUNet
from realnet_train.model.rrs import RRS, stacked_residuals

# Lite0 (cpu preset) widths and strides at 128 px: level -> (channels, stride, size).
LEVELS = {"1": (24, 4, 32), "2": (40, 8, 16), "3": (56, 16, 8), "4": (40, 32, 4)}


@pytest.fixture(scope="module")
def ref():
    """Import the authors' model modules (torch-only ones) with their root on sys.path."""
    if not (REFERENCE / "models" / "rrs" / "rrs.py").is_file():
        pytest.skip(f"the authors' code is absent ({REFERENCE})")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("models", "utils")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(REFERENCE))
    try:
        mods = types.SimpleNamespace(
            recon=importlib.import_module("models.recon.recon"),
            rrs=importlib.import_module("models.rrs.rrs"),
            afs=importlib.import_module("models.afs.afs"),
            criterion=importlib.import_module("utils.criterion_helper"),
        )
        yield mods
    finally:
        sys.path.remove(str(REFERENCE))
        for k in [k for k in sys.modules if k.split(".")[0] in ("models", "utils")]:
            del sys.modules[k]
        sys.modules.update(saved)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (their zero-initialised output convs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("channels", "width"), [(24, 32), (64, 32)])
def test_reconstruction_unet_equals_reference(ref, channels, width):
    """(24, 32): the cpu preset's level 1; (64, 32): the authors' rule width = 0.5 x kept."""
    theirs = ref.recon.ReconstructionLayer(
        inplanes={"block1": channels},
        instrides={"block1": 4},
        num_res_blocks=2,
        hide_channels_ratio=width / channels,
        channel_mult=[1, 2, 4],
        attention_mult=[2, 4],
    )
    their_unet = theirs.block1_recon
    assert their_unet.model_channels == width
    randomise(their_unet, seed=channels)
    ours = ReconstructionUNet(channels, width)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in their_unet.parameters()
    )
    ours.load_state_dict(their_unet.state_dict(), strict=True)
    feats = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs({"block_feats": {"block1": feats}})
        got = ours(feats)
    torch.testing.assert_close(got, expected["feats_recon"]["block1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((feats - got) ** 2, expected["residual"]["block1"])


def test_fresh_reconstruction_outputs_zero_as_reference(ref):
    """Both zero-initialise the output conv: an untrained UNet reconstructs all zeros."""
    out = ReconstructionUNet(24, 32)(torch.randn(1, 24, 8, 8))
    assert torch.count_nonzero(out) == 0


def residual_inputs(seed: int, batch: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"block{lv}": torch.rand(batch, c, s, s, generator=g) ** 3
        for lv, (c, _, s) in LEVELS.items()
    }


@pytest.mark.parametrize("counts", [(32, 32), (8, 40)])
def test_rrs_and_head_equal_reference(ref, counts):
    strides = {f"block{lv}": st for lv, (_, st, _) in LEVELS.items()}
    inplanes = {f"block{lv}": c for lv, (c, _, _) in LEVELS.items()}
    theirs = ref.rrs.RRS(
        inplanes=inplanes,
        instrides=strides,
        modes=["max", "mean"],
        mode_numbers=list(counts),
        num_residual_layers=2,
        stop_grad=False,
    )
    randomise(theirs, seed=3)
    rrs = RRS(sum(inplanes.values()), counts)
    head = SegmentationHead(sum(counts), num_residual_layers=2)
    state = theirs.state_dict()
    rrs.load_state_dict({k: v for k, v in state.items() if k.startswith("bn_idx.")})
    head.load_state_dict({k: v for k, v in state.items() if k.startswith("decoder")})

    image = torch.zeros(4, 3, 128, 128)
    for mode in ("train", "eval"):  # batch statistics, then the running ones both updated
        theirs.train(mode == "train")
        rrs.train(mode == "train")
        head.train(mode == "train")
        res = residual_inputs(seed=5 if mode == "train" else 6)
        expected = theirs({"residual": res, "image": image})
        stacked = stacked_residuals(res, strides)
        logits = head(rrs(stacked), (128, 128))
        torch.testing.assert_close(logits, expected["logit"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.softmax(1)[:, 1:], expected["anomaly_score"])
    torch.testing.assert_close(rrs.bn_idx.running_var, theirs.bn_idx.running_var)


def test_rrs_ranks_batchnormed_but_passes_raw_residuals():
    """The BN only ranks: a channel with small but unusual values wins over a big flat one."""
    res = torch.ones(8, 3, 4, 4) * 10.0  # channel 0: big, the same in every image
    res[:, 0] += 0.01 * torch.randn(8, 4, 4)
    res[:, 1] = 0.0
    res[0, 1, 2, 2] = 0.5  # channel 1: small, but far above its usual value in image 0
    res[:, 2] = 1.0
    rrs = RRS(3, (1, 1)).train()
    out = rrs(res)
    assert torch.equal(out[0, 0], res[0, 1])  # image 0: top by max is channel 1 ...
    assert out[0, 0].max() == 0.5  # ... and the raw residual goes on
    raw_top = res[0].flatten(1).amax(1).argmax()
    assert raw_top == 0  # ranking the raw residuals (the old RRS) would pick channel 0


def afs_setup(batches: int = 5, batch: int = 4, seed: int = 0):
    """Random clean/anomalous features of 4 levels with blob masks, several batches."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        masks = torch.zeros(batch, 1, 128, 128)
        for i in range(batch):
            y, x = torch.randint(0, 96, (2,), generator=g).tolist()
            masks[i, 0, y : y + 32, x : x + 32] = 1.0
        clean, anom = {}, {}
        for lv, (c, _, s) in LEVELS.items():
            clean[f"layer{lv}"] = torch.randn(batch, c, s, s, generator=g)
            small = torch.nn.functional.interpolate(masks, size=(s, s), mode="nearest")
            gain = torch.rand(1, c, 1, 1, generator=g) * 2
            noise = torch.randn(batch, c, s, s, generator=g)
            anom[f"layer{lv}"] = clean[f"layer{lv}"] + small * gain + 0.5 * noise
        data.append({"mask": masks, "feats": anom, "gt": clean})
    return data


def test_afs_selection_equals_reference(ref, monkeypatch):
    keep = {"1": 24, "2": 40, "3": 28, "4": 5}
    data = afs_setup()

    class Loader:  # the authors read anomaly_types off the dataset and iterate the loader
        dataset = types.SimpleNamespace(anomaly_types={"normal": 0.5, "sdas": 0.5})

        def __iter__(self):
            return iter(data)

    class Model:
        device = torch.device("cpu")

        def backbone(self, batch, train=False):
            wrap = {k: {"feat": v} for k, v in batch["feats"].items()}
            return {"feats": wrap, "gt_feats": {k: {"feat": v} for k, v in batch["gt"].items()}}

        def eval(self):
            return self

        def train(self):
            return self

    monkeypatch.setattr(ref.afs, "to_device", lambda batch, **_: batch)
    structure = [
        {
            "name": f"block{lv}",
            "layers": [{"idx": f"layer{lv}", "planes": k}],
            "stride": LEVELS[lv][1],
        }
        for lv, k in keep.items()
    ]
    theirs = ref.afs.AFS(
        inplanes={f"layer{lv}": c for lv, (c, _, _) in LEVELS.items()},
        instrides={f"layer{lv}": st for lv, (_, st, _) in LEVELS.items()},
        structure=structure,
        init_bsn=len(data),
    )
    with pytest.warns(UserWarning):  # their nn.MSELoss(reduce=False) is deprecated
        theirs.init_idxs(Model(), Loader(), distributed=False)

    ours = AFS({f"level{lv}": k for lv, k in keep.items()})
    errors: dict[str, torch.Tensor] = {}
    for batch in data:
        for lv in keep:
            e = channel_mask_errors(batch["gt"][f"layer{lv}"], batch["feats"][f"layer{lv}"],
                                    batch["mask"])  # fmt: skip
            errors[f"level{lv}"] = errors.get(f"level{lv}", 0) + e
    ours.fit(errors)
    for lv in keep:
        assert (
            ours.indices(f"level{lv}").tolist() == theirs.indexes[f"block{lv}_layer{lv}"].tolist()
        )
    # Not trivial: level 3 keeps 28 of 56, level 4 keeps 5 of 40.
    assert ours.indices("level4").tolist() != list(range(5))


def test_losses_equal_reference(ref):
    g = torch.Generator().manual_seed(2)
    recon = {lv: torch.randn(2, 8, 4, 4, generator=g) for lv in ("a", "b")}
    clean = {lv: torch.randn(2, 8, 4, 4, generator=g) for lv in ("a", "b")}
    logits = torch.randn(2, 2, 16, 16, generator=g)
    masks = (torch.rand(2, 16, 16, generator=g) > 0.7).float()
    out = RealNetOutput(logits, logits.softmax(1)[:, 1], torch.zeros(2), {}, recon)
    ours = realnet_losses(out, clean, masks)
    batch = {
        "feats_recon": recon,
        "gt_block_feats": clean,
        "logit": logits,
        "mask": masks[:, None],
        "image": torch.zeros(2, 3, 16, 16),
    }
    mse = ref.criterion.FeatureMSELoss(weight=1.0)(batch)
    ce = ref.criterion.SegmentCrossEntropyLoss(weight=1.0)(batch)
    torch.testing.assert_close(ours["recon"], mse)
    torch.testing.assert_close(ours["seg"], ce)
    torch.testing.assert_close(ours["total"], mse + ce)


def test_image_score_equals_reference(monkeypatch):
    """avg-pool 16 (stride 1) then max, as their ``EvalImageMax`` (its CUDA copy skipped)."""
    path = REFERENCE / "utils" / "eval_helper.py"
    if not path.is_file():
        pytest.skip(f"the authors' code is absent ({path})")
    # eval_helper imports tabulate and scikit-image for other metrics: stand-ins suffice.
    for name in ("tabulate", "skimage"):
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.measure = None  # ``from skimage import measure``
            monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=True)
    spec = importlib.util.spec_from_file_location("_realnet_eval_helper", path)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    maps = torch.rand(5, 64, 64, generator=torch.Generator().manual_seed(4))
    expected = helper.EvalImageMax.encode_pred(maps.numpy(), [16, 16])
    torch.testing.assert_close(image_scores(maps, 16), torch.from_numpy(expected))
