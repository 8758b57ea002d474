"""Run a function on P real processes joined by a gloo process group, for tests of distributed code.

    results = run_distributed(my_top_level_fn, 2, arg1, arg2)   # [fn(0, 2, arg1, arg2), fn(1, 2, ...)]

`fn` must be a picklable top-level function (spawned children import its module).
Each child gets the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, unless init_process_group=False,
an initialised default group; the function's return value travels back through
torch.save bytes (no shared-memory tensors that die with the child). An exception
in any rank is re-raised in the parent with that rank's traceback; a hang ends in
TimeoutError after `timeout_s`, with every child killed.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, backend: str, init_process_group: bool,
           timeout_s: float, results, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # DeepSpeed puts the model on its accelerator: the CPU one for gloo children, CUDA for NCCL ones
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if backend == "nccl" else "cpu")
    torch.set_num_threads(1)  # P children on a 2-core machine: oversubscription only slows them
    try:
        if init_process_group:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, not die silently
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, backend: str = "gloo",
                    init_process_group: bool = True) -> list:
    """[fn(rank, world_size, *args) for each rank], each run in its own spawned process."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, backend, init_process_group,
                                              timeout_s, results, args), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"{fn.__name__} on {world_size} processes: ranks {missing} gave no result "
                                   f"within {timeout_s:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode not in (None, 0)]
                if dead:  # killed by a signal or crashed before it could report
                    raise RuntimeError(f"{fn.__name__}: rank {dead[0]} exited with code "
                                       f"{procs[dead[0]].exitcode} without a result") from None
                continue
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{payload}")
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
