"""Process-group plumbing for ``torchrun``: which rank this is, its device, and the few
collectives the trainer needs. Without torchrun's environment everything degrades to a
single process and the collectives are no-ops."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fusedgpt.hardware import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (NCCL for CUDA, gloo for CPU).

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            Under torchrun each rank takes ``cuda:LOCAL_RANK``, so a device index is only
            accepted in a single process.

    Raises:
        ValueError: not a device name, a device this machine lacks, or an index under torchrun.
    """
    chosen = resolve_device(device)
    use_cuda = chosen.type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and world_size > 1 and chosen.index is not None:
        raise ValueError(f"--device {device}: under torchrun every process takes cuda:LOCAL_RANK; use --device cuda")
    if use_cuda:
        target = chosen if chosen.index is not None else torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return DistContext(rank, local_rank, world_size, target)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (gloo has no AVG); identity in one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
