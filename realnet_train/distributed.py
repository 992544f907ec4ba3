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
