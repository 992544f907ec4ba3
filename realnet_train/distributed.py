"""Multi-process training under ``torchrun``: process group, device, and the few collectives.

``torchrun --nproc_per_node N -m realnet_train.cli ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` joins the group (NCCL on GPUs, gloo on CPU) and picks this
rank's device. Outside torchrun everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that dies does not leave the others hanging


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; choose this process's device.

    Args:
        device: ``cpu``, ``cuda`` or None (CUDA when available, one GPU per local rank).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
        owns = True
        log.info("rank %d of %d on %s", rank, world, dev)
    return DistInfo(rank, world, local, dev, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(module: nn.Module, info: DistInfo, skip: str = "backbone.") -> None:
    """Copy rank 0's parameters and buffers (except ``skip*``) to every rank."""
    if not info.enabled:
        return
    state = [
        {k: v.cpu() for k, v in module.state_dict().items() if not k.startswith(skip)}
        if info.is_main
        else None
    ]
    dist.broadcast_object_list(state, src=0)
    module.load_state_dict(state[0], strict=False)


def sum_across(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the same list back on one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """``obj`` from every rank, in rank order."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training statistics span all ranks, for CPU (gloo) ranks.

    ``torch.nn.SyncBatchNorm`` (what :func:`convert_sync_batchnorm` uses on CUDA) syncs
    CUDA batches only; this one computes the global mean and variance with two
    autograd-aware ``all_reduce`` calls, so gradients flow through the statistics as in
    torch's. Outside a process group, or in eval mode, it is a plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            msg = f"expected at least 2D input (got {x.dim()}D input)"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not (self.training and world > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype))
        mean = all_reduce(x.sum(dims)) / count
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count  # biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, skip: str = "backbone") -> nn.Module:
    """Every BatchNorm of ``module`` outside submodules named ``skip`` synced across ranks,
    as the authors convert theirs under DDP: ``torch.nn.SyncBatchNorm`` for a module on
    CUDA, :class:`CPUSyncBatchNorm` on CPU (the frozen backbone keeps ImageNet's statistics
    in eval mode, so it stays as it is). Returns ``module``, changed in place (parameters
    are new objects: convert before making the optimizer)."""
    for name, child in module.named_children():
        if name == skip:
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, nn.SyncBatchNorm | CPUSyncBatchNorm
        ):
            held = next(iter([*child.buffers(), *child.parameters()]), None)
            cuda = held is not None and held.device.type == "cuda"
            cls = nn.SyncBatchNorm if cuda else CPUSyncBatchNorm
            sync = cls(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync if held is None else sync.to(held.device))
        else:
            convert_sync_batchnorm(child, skip)
    return module
