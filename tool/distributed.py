"""One process or many: torchrun ranks, the released DataParallel, or a single device.

A script calls :func:`init_distributed` once, moves its model to ``info.device``, wraps it with
:func:`wrap_model` and saves ``unwrap(model)``. Under ``torchrun`` every rank runs the whole
script; :func:`shard` splits inference work.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tool.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and TensorBoard files."""
        return self.rank == 0


def _parse_device(device: str | None) -> torch.device:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (expected e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return parsed


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else run one process on ``device``.

    ``device`` defaults to ``cuda`` when available. Under torchrun a CUDA device becomes
    ``cuda:LOCAL_RANK`` (NCCL); a CPU device uses Gloo.
    """
    parsed = _parse_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=parsed, distributed=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parsed.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        parsed = torch.device("cuda", local_rank)
        torch.cuda.set_device(parsed)
    if not dist.is_initialized():
        if parsed.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=parsed)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=parsed, distributed=True)


@contextlib.contextmanager
def distributed_session(device: str | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed`, and :func:`cleanup` however the block ends; the ranks leave
    together when it ends normally (not after an error: the other ranks may never get there)."""
    info = init_distributed(device)
    try:
        yield info
    except BaseException:
        cleanup()
        raise
    cleanup(together=True)


def cleanup(together: bool = False) -> None:
    """Leave the process group (a no-op for a single process).

    First the wrappers that hold it go: DistributedDataParallel can outlive the function that used
    it (reference cycles through its hooks' closures), and with it its reducer, the process group
    and the last all-reduce's work; left to the cyclic collector they may be destroyed after the
    group or while the interpreter shuts down, where a rank can abort at exit. ``together``: then a
    barrier, so that no rank closes its connections while another still finishes its last collective.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if together:
        dist.barrier()
    dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel under torchrun; DataParallel over all visible GPUs when one process
    was given plain ``cuda`` and sees several (the released behaviour); else ``model`` itself.

    Buffers are not broadcast: frozen BatchNorm never changes them, and a BatchNorm that trains
    normalises with batch statistics, so other ranks' running statistics are never read (rank 0's
    are the ones saved).
    """
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.14 renamed broadcast_buffers; the aarch64 pin (2.9) knows only the old name.
        no_buffer_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else "broadcast_buffers")
        return ddp(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters, **{no_buffer_sync: False})
    if info.device.type == "cuda" and info.device.index is None and torch.cuda.device_count() > 1:
        return nn.DataParallel(model)
    return model


def memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The layout of weights and inputs: channels-last on CUDA when asked (``--channels_last``),
    else contiguous. Not on the CPU: torch 2.14's oneDNN corrupts the heap in the weight gradient
    of a strided 1x1 convolution in channels-last (ResNet-38's shortcuts)."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP, DataParallel or torch.compile wrappers (what checkpoints hold)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def shard(items: list, info: DistInfo) -> list:
    """This rank's share of ``items``: every ``world_size``-th item from position ``rank``."""
    return items[info.rank::info.world_size]


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (a no-op for a single process)."""
    if info.distributed:
        dist.barrier()


def main_rank_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (every rank must call it; the others' values are ignored)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.broadcast(value, src=0)
    return bool(value.item() == 1.0)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over all ranks (for logging; every rank must call it)."""
    if not info.distributed:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(total)
    return total.item() / info.world_size


def ranks_agree(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds bit-identical parameters (compared by float64 checksums; every
    rank must call it). Buffers are left out: DDP does not sync BatchNorm statistics here."""
    if not info.distributed:
        return True
    sums = torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).to(info.device)
    reference = sums.clone()
    dist.broadcast(reference, src=0)
    agree = torch.tensor([1.0 if torch.equal(sums, reference) else 0.0], device=info.device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item() == 1.0)

