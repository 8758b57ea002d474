"""The frozen Gaussian codebook C: regenerated from (seed, K, d), never stored.

Rows are drawn in fixed blocks, each from its own generator, so any rank can build
any row range [start, stop) and get exactly the rows a single process would.
"""

from __future__ import annotations

import torch

ROWS_PER_BLOCK = 4096
_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, block) pairs over the 63-bit seed space


def _block_seed(seed: int, block: int) -> int:
    return (seed * _GOLDEN + block) % (2**63 - 1)


def gaussian_rows(seed: int, codebook_size: int, dim: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of C ~ N(0, dim^-1/2 std) as fp32 on the CPU (the reference's init)."""
    stop = codebook_size if stop is None else stop
    if not 0 <= start <= stop <= codebook_size:
        raise ValueError(f"row range [{start}, {stop}) is outside a codebook of {codebook_size} rows")
    out = torch.empty(stop - start, dim, dtype=torch.float32)
    generator = torch.Generator()
    first, last = start // ROWS_PER_BLOCK, (stop - 1) // ROWS_PER_BLOCK if stop > start else -1
    for block in range(first, last + 1):
        block_start = block * ROWS_PER_BLOCK
        block_rows = min(ROWS_PER_BLOCK, codebook_size - block_start)
        generator.manual_seed(_block_seed(seed, block))
        rows = torch.randn(block_rows, dim, generator=generator)
        lo, hi = max(start, block_start), min(stop, block_start + block_rows)
        out[lo - start : hi - start] = rows[lo - block_start : hi - block_start]
    return out.mul_(dim**-0.5)


def shard_range(codebook_size: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, stop) owned by `shard` of `num_shards`; the first K % P shards get one extra row."""
    base, extra = divmod(codebook_size, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)
