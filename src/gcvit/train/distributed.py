"""Distributed setup under torchrun: process group, device, rank helpers and metric reduction."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # whether `setup` started the process group (and `cleanup` may destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_device_name(text: str) -> bool:
    """Whether `text` names a device these commands run on: 'cpu', 'cuda' or 'cuda:N'."""
    return re.fullmatch(r"cpu|cuda(:\d+)?", text) is not None


def parse_device(device: object) -> torch.device:
    """`device` ('cpu', 'cuda', 'cuda:N' or a torch.device) as a torch.device; a ValueError naming what was expected
    for anything else."""
    if isinstance(device, torch.device):
        return device
    text = str(device)
    if not is_device_name(text):
        raise ValueError(f"expected --device cpu, cuda or cuda:N; got {text!r}")
    return torch.device(text)


def require_cuda(device: object) -> None:
    """Raise a ValueError naming `device` when it is no device name, or asks for CUDA on a machine without it."""
    dev = parse_device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices")


def setup(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group (nccl on CUDA, gloo on CPU).

    Args:
        device: 'cpu', 'cuda', 'cuda:N' (a single process only; under torchrun each takes cuda:LOCAL_RANK) or None
            (CUDA when available).

    Returns:
        This process's rank, world size and device; a single process when WORLD_SIZE is unset or 1.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        require_cuda(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        asked = torch.device(device).index if device is not None else None
        if asked is not None and world_size > 1 and asked != local_rank:
            raise ValueError(
                f"under torchrun each process trains on cuda:LOCAL_RANK (here cuda:{local_rank}); pass --device cuda, "
                f"not {device}, and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        index = local_rank if asked is None else asked
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, owns_group)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group `setup` started; one the caller had started before stays theirs."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on any rank."""
    return all_reduce_sum([float(flag)], info)[0] > 0


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
