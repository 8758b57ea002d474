"""Yardsticks for the exact nearest-code search, shared by the search benchmark (bench_search.py) and the tests.

- fp64_optimum / fp64_excess: the fp64 optimum per token and how far a chosen code is from it,
  with the few-fp32-ulp slack an exact fp32 search may lose;
- check_main: the sharded search on spawned gloo CPU processes against one process, on data with
  planted ties across shards (planted_codes, check_tokens) and an uneven token split
  (check_token_counts) that leaves rank 0 empty.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simvq_scale.quant.codebook import gaussian_rows, shard_range
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.search_triton import FP32_GAMMA_PER_TERM
from simvq_scale.quant.sharded import check_codebook_size, sharded_nearest


@torch.no_grad()
def fp64_optimum(z: torch.Tensor, codes: torch.Tensor, chunk_size: int = 16384) -> torch.Tensor:
    """min_k ||c_k||^2 - 2 z.c_k in fp64 for each token (the yardstick for exactness checks)."""
    z64, c64 = z.double(), codes.double()
    best = torch.full((z.shape[0],), float("inf"), dtype=torch.float64, device=z.device)
    for c0 in range(0, codes.shape[0], chunk_size):
        block = c64[c0 : c0 + chunk_size]
        best = torch.minimum(best, (block.pow(2).sum(dim=1) - 2.0 * z64 @ block.T).amin(dim=1))
    return best


@torch.no_grad()
def fp64_excess(z: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor, optimum: torch.Tensor | None = None,
                origin: torch.Tensor | None = None):
    """(excess, tolerance) per token: the chosen code's fp64 distance minus the fp64 optimum, and the
    few-fp32-ulp slack an exact fp32 search may lose. A search is wrong where excess > tolerance.

    `origin` (d,): measure in the frame centred there (z - origin, codes - origin, shifted in fp64).
    Distances do not change; the slack becomes that of a search done in that frame, so a search
    that does not centre its frame is held to what one that does achieves.
    """
    if origin is not None:
        z, codes = z.double() - origin.double(), codes.double() - origin.double()
        optimum = None  # an optimum measured in another frame differs by ||z - origin||^2 - ||z||^2
    z64, chosen_codes = z.double(), codes[idx].double()
    optimum = fp64_optimum(z, codes) if optimum is None else optimum
    chosen = chosen_codes.pow(2).sum(dim=1) - 2.0 * (z64 * chosen_codes).sum(dim=1)
    sq_max = codes.double().pow(2).sum(dim=1).amax()
    p = z64.norm(dim=1) * sq_max.sqrt()
    tolerance = 4.0 * FP32_GAMMA_PER_TERM * ((z.shape[1] + 2) * p + sq_max + 2.0 * p)
    return chosen - optimum, tolerance


# ---- the multi-process exactness check of the sharded search (tools/bench_search.py --check)

def planted_codes(seed: int, codebook_size: int, dim: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a Gaussian codebook whose last rows copy its first ones (exact ties across shards)."""
    stop = codebook_size if stop is None else stop
    rows = gaussian_rows(seed, codebook_size, dim, start, stop)
    sources = _planted_sources(seed, codebook_size, dim)
    for source in range(sources.shape[0]):
        copy = codebook_size - 1 - source
        if start <= copy < stop:
            rows[copy - start] = sources[source]
    return rows


def _planted_sources(seed: int, codebook_size: int, dim: int) -> torch.Tensor:
    """Rows 0..m-1, copied into rows K-1..K-m by planted_codes (m = min(8, K // 2))."""
    return gaussian_rows(seed, codebook_size, dim, 0, min(8, codebook_size // 2))


def check_tokens(seed: int, codebook_size: int, tokens: int, dim: int) -> torch.Tensor:
    """Gaussian tokens; every fourth one is a planted row itself, equidistant from the row and its copy."""
    generator = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(tokens, dim, generator=generator) * dim**-0.5
    sources = _planted_sources(seed, codebook_size, dim)
    if sources.shape[0]:
        planted = torch.arange(0, tokens, 4)
        z[planted] = sources[(planted // 4) % sources.shape[0]]
    return z


def check_token_counts(tokens: int, world_size: int) -> list[int]:
    """Uneven split: rank r gets a share proportional to r (rank 0 none when P > 1); the last takes the rest."""
    if world_size == 1:
        return [tokens]
    weight_total = world_size * (world_size - 1) // 2
    counts = [tokens * r // weight_total for r in range(world_size)]
    counts[-1] += tokens - sum(counts)
    return counts


def _check_rank(rank: int, world_size: int, rendezvous: str, out_dir: str, codebook_size: int, tokens: int,
                dim: int, seed: int, timeout_s: float) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        start, stop = shard_range(codebook_size, rank, world_size)
        counts = check_token_counts(tokens, world_size)
        first = sum(counts[:rank])
        z = check_tokens(seed, codebook_size, tokens, dim)[first : first + counts[rank]]
        idx = sharded_nearest(z, planted_codes(seed, codebook_size, dim, start, stop), start, dist.group.WORLD)
        torch.save(idx, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def check_main(world_size: int, codebook_size: int, tokens: int, dim: int, seed: int,
               timeout_s: float = 300.0) -> dict:
    """Run sharded_nearest on `world_size` spawned gloo CPU processes; count mismatches against one process.

    The data has planted ties (codebook rows copied across shards, tokens equal to
    them) and an uneven token split with an empty rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    check_codebook_size(codebook_size)
    with tempfile.TemporaryDirectory(prefix="sharded_check_") as out_dir:
        rendezvous = os.path.join(out_dir, "rendezvous")
        mp.start_processes(_check_rank, args=(world_size, rendezvous, out_dir, codebook_size, tokens, dim, seed,
                                              timeout_s), nprocs=world_size, join=True, start_method="spawn")
        sharded = torch.cat([torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)])
    reference = nearest_code(check_tokens(seed, codebook_size, tokens, dim), planted_codes(seed, codebook_size, dim))[1]
    return {"world_size": world_size, "codebook_size": codebook_size, "tokens": tokens,
            "mismatches": int((sharded != reference).sum())}
