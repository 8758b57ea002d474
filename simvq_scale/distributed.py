"""Process-group set-up under deepspeed, torchrun or plain python, and the package's rank helpers.

Plain `python launch/train.py` sets RANK nowhere: we then make a one-process
rendezvous on a free local port ourselves, so every code path is the distributed
one with world size 1. The helpers below answer for one process (rank 0 of 1) when
no process group exists, so library code and tools run the same with or without one.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket

import torch
import torch.distributed as dist

from simvq_scale.config import TrainConfig, shard_group_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """Fill the torch.distributed env:// variables for a single process when no launcher did."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def prepare_cpu_deepspeed(skip_shm_build: bool = True) -> None:
    """DeepSpeed on CPUs over gloo: its CPU accelerator (DS_ACCELERATOR=cpu unless set) and, with
    `skip_shm_build`, no build of the shared-memory collective op it compiles on its first init (~75 s),
    which gloo does not need. Call it before DeepSpeed initialises (the tests' conftest does too);
    skipping the build imports deepspeed, so callers that will not use DeepSpeed leave it off."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if skip_shm_build:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(timeout_s: float = TrainConfig.collective_timeout_s, use_deepspeed: bool = True) -> torch.device:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPUs. Returns this rank's device.

    `timeout_s` (train.collective_timeout_s) bounds how long any collective waits for the slowest rank;
    a group that already exists keeps the timeout it was made with."""
    ensure_launcher_env()
    device = device_for_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        prepare_cpu_deepspeed(skip_shm_build=use_deepspeed)  # also when the group exists already
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        return device
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def initialized() -> bool:
    """A default process group exists (torch built without distributed support has none)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks, in place (collective when there are several ranks); returns `t`."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order (collective when there are several ranks)."""
    if world_size() == 1:
        return [obj]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def codebook_shard_group(group: str) -> tuple[dist.ProcessGroup | None, int, int]:
    """(process group, my index in it, its size) for `quantizer.shard.group`; (None, 0, 1) when replicated.

    The groups are contiguous rank ranges of equal size (ranks 0..s-1, s..2s-1, ...: one node each for
    "node"), which is what torch.distributed.new_subgroups makes. Every rank must call this, in the same
    order: creating groups is itself a collective.
    """
    size = shard_group_size(group, world_size(), local_world_size())
    if size == 1:
        return None, 0, 1
    if size == world_size():
        return dist.group.WORLD, rank(), size
    mine, _ = dist.new_subgroups(group_size=size)
    return mine, dist.get_rank(mine), size
