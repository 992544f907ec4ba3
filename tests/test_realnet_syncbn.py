"""RealNet under DDP normalises over the global batch, as the authors' SyncBatchNorm does.

Two gloo processes with 4 images each run one training step of the same model (the
trainer's conversion and DDP wrapping) and one process runs the same 8 images at once. Compared:
the BatchNorm running statistics after the step (RRS's ranking BatchNorm and the head's)
and the RRS channel choice of every image (top-k by spatial max and by mean of the
standardised residuals), plus the head's gradients after DDP's averaging. Tolerance:
statistics and gradients to rtol 1e-4 / atol 1e-6 (float32 sums in another order), channel
choice exactly. Without the conversion the same 2 x 4 run differs (the control).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from realnet_helpers import tiny_model_config

from realnet_train import distributed
from realnet_train.model.realnet import RealNet
from realnet_train.train import TrainStep

B, SIZE = 8, 32
RTOL, ATOL = 1e-4, 1e-6


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(B, 3, SIZE, SIZE, generator=g)
    clean = torch.rand(B, 3, SIZE, SIZE, generator=g)
    masks = (torch.rand(B, SIZE, SIZE, generator=g) > 0.7).float()
    return images, clean, masks


def _step(rows: slice, sync: bool) -> dict[str, torch.Tensor]:
    """One training step on ``rows`` of the batch; what the test compares."""
    torch.manual_seed(0)
    model = RealNet(tiny_model_config())
    model.train()
    if sync:
        distributed.convert_sync_batchnorm(model)
    step: torch.nn.Module = TrainStep(model)
    if dist.is_initialized():
        step = torch.nn.parallel.DistributedDataParallel(step, broadcast_buffers=False)
    ranked = []
    model.rrs.bn_idx.register_forward_hook(lambda _m, _i, out: ranked.append(out.detach()))
    images, clean, masks = (t[rows] for t in _batch())
    step(images, clean, masks)["total"].backward()
    flat = ranked[0].flatten(2)
    k_max, k_mean = model.rrs.counts
    head_bn = model.head.decoder1[2]
    return {
        "rrs_mean": model.rrs.bn_idx.running_mean.clone(),
        "rrs_var": model.rrs.bn_idx.running_var.clone(),
        "head_mean": head_bn.running_mean.clone(),
        "head_var": head_bn.running_var.clone(),
        "head_grad": head_bn.weight.grad.clone(),
        "by_max": flat.amax(2).topk(k_max, dim=1).indices,
        "by_mean": flat.mean(2).topk(k_mean, dim=1).indices,
    }


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rows = slice(rank * B // 2, (rank + 1) * B // 2)
        torch.save({"sync": _step(rows, True), "plain": _step(rows, False)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def test_two_ranks_of_4_match_one_process_of_8(tmp_path):
    one = _step(slice(0, B), sync=False)
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    for r, res in enumerate(ranks):
        sync = res["sync"]
        for name in ("rrs_mean", "rrs_var", "head_mean", "head_var", "head_grad"):
            diff = (sync[name] - one[name]).abs().max().item()
            print(f"rank {r} {name}: max |2x4 - 1x8| = {diff:.2e}")
            assert _close(sync[name], one[name]), name
        half = slice(r * B // 2, (r + 1) * B // 2)
        assert torch.equal(sync["by_max"], one["by_max"][half])
        assert torch.equal(sync["by_mean"], one["by_mean"][half])
    # the control: per-rank BatchNorm gives each rank its own statistics
    plain = ranks[0]["plain"]
    assert not _close(plain["rrs_var"], one["rrs_var"])
    assert not _close(plain["head_mean"], one["head_mean"])
