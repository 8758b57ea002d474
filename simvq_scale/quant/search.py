"""Exact nearest-code search: argmin_k ||z - c_k||^2 without an N x K matrix.

The ||z||^2 term is the same for every code and is dropped, so the distance we
minimise is ||c_k||^2 - 2 z.c_k. Products run in fp32 (never TF32 or autocast's
bf16); the codebook is walked in chunks with a running minimum, and a strict
"<" update keeps ties on the lowest index. On CUDA the fused Triton kernel in
search_triton.py does the same in one pass; this torch path is the reference
and the CPU path (nearest.py chooses between them).

That form cancels catastrophically when tokens and codes share a large offset o
(||c||^2 ~ ||o||^2 while the distances are ~ spread^2), so callers pass tokens and
codes in a frame centred near the codes: any common shift leaves every distance
unchanged, and the quantizers shift by a point they already have (SimVQ: the bias b).
"""

from __future__ import annotations

import contextlib

import torch

# Bound on the fp32 score block (tokens x codes) held at once: 64 Mi elements = 256 MiB.
SCORE_BLOCK_ELEMENTS = 64 * 2**20


@contextlib.contextmanager
def exact_fp32(device_type: str):
    """No autocast and no TF32 inside: the search's products are true fp32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def squared_norms(codes: torch.Tensor) -> torch.Tensor:
    return codes.float().pow(2).sum(dim=1)


@torch.no_grad()
def nearest_code_torch(
    z: torch.Tensor,
    codes: torch.Tensor,
    codes_sq: torch.Tensor | None = None,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min distance without ||z||^2, argmin index) for each row of z (N, d) over codes (K, d)."""
    if z.dim() != 2 or codes.dim() != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_code expects z (N, d) and codes (K, d), got {tuple(z.shape)} and {tuple(codes.shape)}")
    n, k = z.shape[0], codes.shape[0]
    with exact_fp32(z.device.type):
        z = z.float()
        codes = codes.float()
        codes_sq = squared_norms(codes) if codes_sq is None else codes_sq.float()
        best = torch.full((n,), float("inf"), device=z.device)
        best_idx = torch.zeros(n, dtype=torch.long, device=z.device)
        token_block = max(1, min(n, SCORE_BLOCK_ELEMENTS // max(1, min(chunk_size, k))))
        code_block = max(1, min(chunk_size, SCORE_BLOCK_ELEMENTS // max(1, min(n, token_block))))
        for t0 in range(0, n, token_block):
            zt = z[t0 : t0 + token_block]
            bt, bi = best[t0 : t0 + token_block], best_idx[t0 : t0 + token_block]
            for c0 in range(0, k, code_block):
                scores = torch.addmm(codes_sq[c0 : c0 + code_block], zt, codes[c0 : c0 + code_block].T, alpha=-2.0)
                vals, idx = scores.min(dim=1)
                better = vals < bt  # strict: an equal later code never replaces an earlier one
                bt.copy_(torch.where(better, vals, bt))
                bi.copy_(torch.where(better, idx + c0, bi))
                del scores
    return best, best_idx

