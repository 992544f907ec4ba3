"""The lr schedule: constant (the authors') or a cosine to 0 over the run, as torch's."""

from __future__ import annotations

import math

import pytest
import torch
from realnet_helpers import small_mvtec, tiny_train_config

from realnet_train.train import learning_rate, train


def test_constant_keeps_the_rate():
    assert [learning_rate(1e-3, "constant", p) for p in (0, 0.5, 1, 2)] == [1e-3] * 4


def test_cosine_is_torchs_cosine_annealing_to_zero():
    steps = 12
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    for step in range(steps + 1):
        ours = learning_rate(2e-3, "cosine", step / steps)
        assert math.isclose(ours, opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15)
        opt.step()
        sched.step()
    assert learning_rate(2e-3, "cosine", 1.7) == 0.0  # past the end (a late time budget): 0


def test_an_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        learning_rate(1e-3, "linear", 0.5)


def test_a_cosine_run_steps_at_the_decayed_rate(shared_data, tiny_sia, tmp_path):
    data = small_mvtec(shared_data, tmp_path / "mvtec", n_train=8)
    out = tmp_path / "run"
    cfg = tiny_train_config(data, tiny_sia, out, steps=4, lr=1e-3, lr_schedule="cosine")
    result = train(cfg)
    assert result["config"]["lr_schedule"] == "cosine"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    # The last step (index 3 of 4) ran at the cosine's value at progress 3/4.
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        learning_rate(1e-3, "cosine", 3 / 4)
    )
