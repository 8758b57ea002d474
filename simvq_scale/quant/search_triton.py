"""Fused exact nearest-code search on CUDA: fp16 tensor-core tiles, fp32 re-rank, proven complete.

Same answer as search.nearest_code_torch (distance ||c||^2 - 2 z.c in fp32, exact
argmin, ties to the lowest index), without ever holding an N x K score matrix:

1. Rounding. Each code row is scaled by a power of two so its largest entry
   lands in [2^13, 2^14) and rounded to fp16 (entries under fp16's smallest
   normal are flushed to zero by us, so the hardware's subnormal handling cannot
   matter); z gets one power-of-two scale for all tokens. Power-of-two scales are
   exact, so they only move the rounding error into fp16's 11-bit significand.
   The same pass measures, per row, the real rounding residual
   r = ||x - fp16(x)/scale|| and h = ||fp16(x)/scale|| in fp32.
2. Fused kernel. Tiles of BLOCK_M tokens x BLOCK_K codes are multiplied on the
   tensor cores (fp16 x fp16 -> fp32) and turned into low-precision scores
   s = ||c||^2 - 2 z.c; each tile is reduced to its per-token minimum, and every
   token keeps in registers its four best tiles and the fifth-best tile minimum.
   Only those nine numbers per token (per split of the codebook) reach memory.
3. Margin. For every code, |s_lowp - s_real| <= b(z) with
       b(z) = 2 (|z| R_c + r_z H_c + g |zh| H_c) + 2^-23 (Q + 2 P)
   where R_c = max_k r_k, H_c = max_k h_k (codes), r_z, |zh| the token's own
   residual and fp16 norm, P = |z| max_k |c_k| (Cauchy-Schwarz bound on |z.c|),
   Q = max_k |codes_sq_k| and g = d 2^-21 the fp32 accumulation error of the
   tensor cores (4x the round-to-nearest gamma_d, because the tensor cores
   truncate while aligning addends). The first term is
   |z.c - zh.ch| <= |z| |c - ch| + |z - zh| |ch|; the last bounds the rounding of
   the final add. A true fp32 search (torch's or ours) itself errs by at most
   e32(z) = 2 d 2^-23 P + 2^-23 (Q + 2 P) (gamma_d doubled again). A code
   outside the four kept tiles scores at least the fifth tile minimum m5 in low
   precision, so if m5 > m1 + 1.25 (2 b + 2 e32) its real distance exceeds the
   real optimum by more than 2 e32: it can beat no candidate even after fp32
   rounding. The four kept tiles are then the complete candidate set.
4. Re-rank. The kept tiles' codes are scored again in plain fp32 (CUDA-core
   products, the reference formula ||c||^2 - 2 z.c), ties to the lowest index.
5. Fallback, on the device. Tokens whose margin test fails (planted duplicates in five or
   more tiles, near-ties spread over more than four tiles) are listed in order on the device
   (a cumsum and a searchsorted), and a second kernel, one program per split of the
   codebook, scans its codes in plain fp32 for each of them (ties to the lowest index),
   merging the splits through atomic_min on packed (distance, index) keys; with no such
   token each program reads one count and ends. The re-rank kernel then writes the packed
   answer for those tokens. Nothing is read back to the host, so the search never stalls
   the stream; search_with_stats returns the count as a device tensor.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: search.py keeps the torch path
    triton = None

# Kept tiles per token (the kernel's register state is written for exactly four).
KEPT_TILES = 4
# Largest fp16 exponent target: row maxima land in [2^13, 2^14), far from fp16's 65504.
FP16_TARGET_EXPONENT = 14
# Tensor-core fp32 accumulation error per unit of sum |products|, per summed term.
TENSOR_CORE_GAMMA_PER_TERM = 2.0**-21
FP32_GAMMA_PER_TERM = 2.0**-23
MARGIN_SAFETY = 1.25


# Fallback scan tiles: tokens x codes, the slice of the code dimension one fp32 tl.dot takes, and warps. The
# fastest of eight tried on an H200 (every token re-scanned, K = 262,144): 13.3 us per token at d = 512 and
# 3.6 at d = 128, against 20.6 / 5.6 for 64 x 64 x 32 x 4 and 169 / 29.4 for the former 3-D product-sum kernel.
FALLBACK_BLOCK_M, FALLBACK_BLOCK_K, FALLBACK_CHUNK_D, FALLBACK_WARPS = 128, 128, 32, 8


def runs_on(device: torch.device) -> bool:
    """The kernels can run on `device`: CUDA with Triton, or any device under Triton's interpreter
    (TRITON_INTERPRET=1, which runs them on the CPU, slowly: how the CPU tests check them)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _fp16_rows_kernel(x_ptr, scale_ptr, xh_ptr, inv_scale_ptr, resid_ptr, hnorm_ptr, sq_ptr,
                          rows_total, dim, stride_x, stride_xh,
                          PER_ROW_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Scale rows by a power of two, round to fp16 (flushing subnormals), measure the residual."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < rows_total
        mask = row_ok[:, None] & (cols < dim)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if PER_ROW_SCALE:
            amax = tl.max(tl.abs(x), axis=1)
            biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
            # amax < 2^(biased-126); scale 2^(140-biased) puts it under 2^14 (biased exponent 267-biased).
            scale_exp = tl.minimum(tl.maximum(267 - biased, 1), 253)
            scale = (scale_exp << 23).to(tl.float32, bitcast=True)
            inv_scale = ((254 - scale_exp) << 23).to(tl.float32, bitcast=True)
        else:
            scale = tl.load(scale_ptr + rows * 0)
            inv_scale = 1.0 / scale
        xs = x * scale[:, None]
        xh = xs.to(tl.float16).to(tl.float32)
        xh = tl.where(tl.abs(xh) < 6.103515625e-05, 0.0, xh)  # flush fp16 subnormals ourselves
        tl.store(xh_ptr + rows[:, None] * stride_xh + cols[None, :], xh.to(tl.float16), mask=mask)
        diff = xs - xh
        tl.store(inv_scale_ptr + rows, inv_scale, mask=row_ok)
        tl.store(resid_ptr + rows, tl.sqrt(tl.sum(diff * diff, axis=1)) * inv_scale, mask=row_ok)
        tl.store(hnorm_ptr + rows, tl.sqrt(tl.sum(xh * xh, axis=1)) * inv_scale, mask=row_ok)
        tl.store(sq_ptr + rows, tl.sum(x * x, axis=1), mask=row_ok)

    @triton.jit
    def _best_tiles_kernel(zh_ptr, ch_ptr, codes_sq_ptr, coef_ptr, best_val_ptr, best_tile_ptr,
                           n_tokens, n_codes, dim, stride_z, stride_c, TILES_PER_SPLIT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per token of this block and codes of this split: the four best tiles and the fifth tile minimum.

        Scores are ||c||^2 + coef_k * (zh . ch), coef_k = -2 / (z_scale * c_scale_k), fp16 products
        accumulated in fp32. Outputs best_val (5, splits, N) and best_tile (4, splits, N).
        """
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        z = tl.load(zh_ptr + rows[:, None] * stride_z + cols[None, :],
                    mask=(rows < n_tokens)[:, None] & col_ok[None, :], other=0.0)
        inf = float("inf")
        v1 = tl.full((BLOCK_M,), inf, tl.float32)
        v2 = tl.full((BLOCK_M,), inf, tl.float32)
        v3 = tl.full((BLOCK_M,), inf, tl.float32)
        v4 = tl.full((BLOCK_M,), inf, tl.float32)
        v5 = tl.full((BLOCK_M,), inf, tl.float32)
        t1 = tl.full((BLOCK_M,), -1, tl.int32)
        t2 = tl.full((BLOCK_M,), -1, tl.int32)
        t3 = tl.full((BLOCK_M,), -1, tl.int32)
        t4 = tl.full((BLOCK_M,), -1, tl.int32)
        tile_begin = pid_s * TILES_PER_SPLIT
        # The last split may run past the codebook: its extra tiles score +inf and change nothing.
        for step in range(0, TILES_PER_SPLIT):
            tile = tile_begin + step
            codes = tile * BLOCK_K + tl.arange(0, BLOCK_K)
            code_ok = codes < n_codes
            c = tl.load(ch_ptr + codes[:, None] * stride_c + cols[None, :],
                        mask=code_ok[:, None] & col_ok[None, :], other=0.0)
            sq = tl.load(codes_sq_ptr + codes, mask=code_ok, other=inf)
            coef = tl.load(coef_ptr + codes, mask=code_ok, other=0.0)
            scores = tl.dot(z, tl.trans(c)) * coef[None, :] + sq[None, :]
            x = tl.min(scores, axis=1)
            # Insert the tile minimum x into the sorted list v1..v4 (strict <: an equal later tile goes
            # after); v5 keeps the smallest minimum that fell off the list.
            below1 = x < v1
            below2 = x < v2
            below3 = x < v3
            below4 = x < v4
            v5 = tl.where(below4, v4, tl.minimum(v5, x))
            v4 = tl.where(below3, v3, tl.where(below4, x, v4))
            t4 = tl.where(below3, t3, tl.where(below4, tile, t4))
            v3 = tl.where(below2, v2, tl.where(below3, x, v3))
            t3 = tl.where(below2, t2, tl.where(below3, tile, t3))
            v2 = tl.where(below1, v1, tl.where(below2, x, v2))
            t2 = tl.where(below1, t1, tl.where(below2, tile, t2))
            v1 = tl.where(below1, x, v1)
            t1 = tl.where(below1, tile, t1)
        row_ok = rows < n_tokens
        plane = n_splits * n_tokens
        out = pid_s * n_tokens + rows
        tl.store(best_val_ptr + out, v1, mask=row_ok)
        tl.store(best_val_ptr + plane + out, v2, mask=row_ok)
        tl.store(best_val_ptr + 2 * plane + out, v3, mask=row_ok)
        tl.store(best_val_ptr + 3 * plane + out, v4, mask=row_ok)
        tl.store(best_val_ptr + 4 * plane + out, v5, mask=row_ok)
        tl.store(best_tile_ptr + out, t1, mask=row_ok)
        tl.store(best_tile_ptr + plane + out, t2, mask=row_ok)
        tl.store(best_tile_ptr + 2 * plane + out, t3, mask=row_ok)
        tl.store(best_tile_ptr + 3 * plane + out, t4, mask=row_ok)

    @triton.jit
    def _fallback_kernel(z_ptr, c_ptr, codes_sq_ptr, redo_ptr, redo_count_ptr, keys_ptr,
                         n_codes, dim, stride_z, stride_c, TILES_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr):
        """This split of the codebook scanned in plain fp32 for the tokens redo[:redo_count].

        Distances ||c||^2 - 2 z.c with fp32 products and sums: tl.dot with input_precision="ieee" runs
        on the CUDA cores (no TF32), one fused multiply-add per term in the order of d for every
        (token, code) pair, so equal codes give equal distances. Tiles in index order with a strict
        "<", the lowest index inside a tile. Each token's (distance, index) is packed into an int64
        key whose signed order is their lexicographic order and merged across splits with
        atomic_min: ties go to the lowest index. A split with nothing to redo reads one number and ends.
        """
        first_tile = tl.program_id(0) * TILES_PER_SPLIT
        redo_count = tl.load(redo_count_ptr)
        block = 0
        while block * BLOCK_M < redo_count:
            slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
            active = slots < redo_count
            tokens = tl.load(redo_ptr + slots, mask=active, other=0)
            best = tl.full((BLOCK_M,), float("inf"), tl.float32)
            best_idx = tl.zeros((BLOCK_M,), tl.int32)  # as the torch search: a NaN token gets index 0
            for step in range(0, TILES_PER_SPLIT):
                codes = (first_tile + step) * BLOCK_K + tl.arange(0, BLOCK_K)
                code_ok = codes < n_codes
                dot = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
                # d in chunks, a loop (not unrolled) so the pipeliner buffers one chunk's loads, not the row's;
                # the running sum carries over, so the order of the terms is still that of d
                for d0 in range(0, BLOCK_D, CHUNK_D):
                    cols = d0 + tl.arange(0, CHUNK_D)
                    col_ok = cols < dim
                    zc = tl.load(z_ptr + tokens[:, None] * stride_z + cols[None, :],
                                 mask=active[:, None] & col_ok[None, :], other=0.0)
                    cc = tl.load(c_ptr + codes[:, None] * stride_c + cols[None, :],
                                 mask=code_ok[:, None] & col_ok[None, :], other=0.0)
                    dot = tl.dot(zc, tl.trans(cc), dot, input_precision="ieee")
                sq = tl.load(codes_sq_ptr + codes, mask=code_ok, other=0.0)
                dist = tl.where(code_ok[None, :], sq[None, :] - 2.0 * dot, float("inf"))
                dist = tl.where(dist == 0.0, 0.0, dist)  # -0.0 -> +0.0: equal distances must tie in the key
                tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
                better = tile_best < best
                best = tl.where(better, tile_best, best)
                best_idx = tl.where(better, (first_tile + step) * BLOCK_K + tile_arg, best_idx)
            # fp32 bits order as the floats for positive values and reversed for negative ones
            bits = best.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            tl.atomic_min(keys_ptr + tokens, ordered.to(tl.int64) * 4294967296 + best_idx.to(tl.int64), mask=active)
            block += 1

    @triton.jit
    def _rerank_kernel(z_ptr, c_ptr, codes_sq_ptr, tiles_ptr, complete_ptr, keys_ptr, dist_ptr, idx_ptr,
                       n_codes, dim, stride_z, stride_c,
                       N_KEPT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """One token's answer: the fp32 minimum over every code of its kept tiles, ties to the lowest
        index, when its margin test passed; else the fallback scan's packed (distance, index) key."""
        token = tl.program_id(0)
        if tl.load(complete_ptr + token):
            cols = tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            z = tl.load(z_ptr + token * stride_z + cols, mask=col_ok, other=0.0)
            best = float("inf")
            best_idx = n_codes
            for j in tl.static_range(N_KEPT):
                tile = tl.load(tiles_ptr + token * N_KEPT + j)
                codes = tile * BLOCK_K + tl.arange(0, BLOCK_K)
                code_ok = (codes < n_codes) & (tile >= 0)
                c = tl.load(c_ptr + codes[:, None] * stride_c + cols[None, :],
                            mask=code_ok[:, None] & col_ok[None, :], other=0.0)
                dot = tl.sum(c * z[None, :], axis=1)
                dist = tl.load(codes_sq_ptr + codes, mask=code_ok, other=0.0) - 2.0 * dot
                dist = tl.where(code_ok, dist, float("inf"))
                tile_best, tile_arg = tl.min(dist, axis=0, return_indices=True, return_indices_tie_break_left=True)
                tile_idx = tile * BLOCK_K + tile_arg
                better = (tile_best < best) | ((tile_best == best) & (tile_idx < best_idx))
                best = tl.where(better, tile_best, best)
                best_idx = tl.where(better, tile_idx, best_idx)
            tl.store(dist_ptr + token, best)
            tl.store(idx_ptr + token, best_idx.to(tl.int64))
        else:
            key = tl.load(keys_ptr + token)
            high = key >> 32  # arithmetic shift: the ordered distance bits, sign included
            ordered = high.to(tl.int32)
            bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
            tl.store(dist_ptr + token, bits.to(tl.float32, bitcast=True))
            tl.store(idx_ptr + token, key - high * 4294967296)  # the low 32 bits (no uint32 literal)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fp16_rows(x: torch.Tensor, scale: torch.Tensor | None):
    """(fp16 rows, 1/scale, residual norm, fp16 norm, fp32 squared norm), all in x's units."""
    rows, dim = x.shape
    xh = torch.empty((rows, dim), dtype=torch.float16, device=x.device)
    inv_scale, resid, hnorm, sq = (torch.empty(rows, dtype=torch.float32, device=x.device) for _ in range(4))
    block_d = max(16, _next_pow2(dim))
    block_r = max(1, 4096 // block_d)
    _fp16_rows_kernel[(triton.cdiv(rows, block_r),)](
        x, x if scale is None else scale, xh, inv_scale, resid, hnorm, sq, rows, dim, x.stride(0), xh.stride(0),
        PER_ROW_SCALE=scale is None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return xh, inv_scale, resid, hnorm, sq


def _token_scale(z: torch.Tensor) -> torch.Tensor:
    """One power of two putting max|z| under 2^14 (a 1-element tensor: no host sync)."""
    amax = z.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    _, exponent = torch.frexp(amax)  # amax < 2^exponent
    return torch.ldexp(torch.ones_like(amax), (FP16_TARGET_EXPONENT - exponent).clamp(-126, 126))


def search_margin(z_norm, z_resid, z_hnorm, c_resid_max, c_hnorm_max, c_norm_max, codes_sq_absmax, dim: int):
    """Per-token low-precision score gap that proves the kept tiles hold every possible answer.

    See the module docstring: 1.25 * (2 b + 2 e32), all terms upper bounds in fp32 units.
    """
    p = z_norm * c_norm_max
    rounding_of_add = FP32_GAMMA_PER_TERM * (codes_sq_absmax + 2.0 * p)
    lowp = 2.0 * (z_norm * c_resid_max + z_resid * c_hnorm_max
                  + dim * TENSOR_CORE_GAMMA_PER_TERM * z_hnorm * c_hnorm_max) + rounding_of_add
    fp32 = 2.0 * dim * FP32_GAMMA_PER_TERM * p + rounding_of_add
    return MARGIN_SAFETY * (2.0 * lowp + 2.0 * fp32) + 1e-30


def _splits_for(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_tiles, round(4 * sms / n_blocks)))


@torch.no_grad()
def search_with_stats(z: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor | None = None,
                      block_m: int = 128, block_k: int = 64, num_warps: int = 4, num_stages: int = 4,
                      rescan_all: bool = False):
    """(dist fp32 (N,), idx int64 (N,), tokens re-scanned by the fallback (0-d int64 tensor on z's device)).

    No host sync: every decision, the fallback's included, is taken on the device (module docstring).
    rescan_all sends every token to the fallback's full fp32 scan (what a token whose margin test fails
    gets): how the benchmark times that scan and the tests check it on every token.
    """
    if z.dim() != 2 or codes.dim() != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_code expects z (N, d) and codes (K, d), got {tuple(z.shape)} and {tuple(codes.shape)}")
    if codes.shape[0] == 0:
        raise ValueError("nearest_code needs at least one code, got an empty codebook")
    if codes_sq is not None and codes_sq.shape != (codes.shape[0],):
        raise ValueError(f"codes_sq must have shape ({codes.shape[0]},), got {tuple(codes_sq.shape)}")
    n, dim = z.shape
    n_codes = codes.shape[0]
    z = z.float().contiguous()
    codes = codes.float().contiguous()
    if n == 0:
        return (torch.empty(0, device=z.device), torch.empty(0, dtype=torch.long, device=z.device),
                torch.zeros((), dtype=torch.long, device=z.device))
    block_d = max(16, _next_pow2(dim))
    z_scale = _token_scale(z)
    zh, _, z_resid, z_hnorm, z_sq = _fp16_rows(z, z_scale)
    ch, c_inv_scale, c_resid, c_hnorm, c_sq = _fp16_rows(codes, None)
    codes_sq = c_sq if codes_sq is None else codes_sq.float().contiguous()
    coef = c_inv_scale * (-2.0 / z_scale)  # powers of two: exact

    n_blocks = triton.cdiv(n, block_m)
    n_tiles = triton.cdiv(n_codes, block_k)
    splits = _splits_for(n_blocks, n_tiles, z.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    best_val = torch.empty((KEPT_TILES + 1, splits, n), dtype=torch.float32, device=z.device)
    best_tile = torch.empty((KEPT_TILES, splits, n), dtype=torch.int32, device=z.device)
    _best_tiles_kernel[(n_blocks, splits)](
        zh, ch, codes_sq, coef, best_val, best_tile, n, n_codes, dim, zh.stride(0), ch.stride(0),
        TILES_PER_SPLIT=tiles_per_split, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages)
    del ch

    # Merge the splits: the best KEPT_TILES tiles overall and the next tile minimum (a lower bound on
    # every other tile: the next smallest of the kept lists, or a split's own dropped minimum).
    kept_vals = best_val[:KEPT_TILES].permute(2, 0, 1).reshape(n, KEPT_TILES * splits)
    kept_all = best_tile.permute(2, 0, 1).reshape(n, KEPT_TILES * splits)
    order = torch.argsort(kept_vals, dim=1, stable=True)[:, : KEPT_TILES + 1]
    top_vals = kept_vals.gather(1, order)
    kept_tiles = kept_all.gather(1, order[:, :KEPT_TILES]).contiguous()
    following = best_val[KEPT_TILES].amin(dim=0)
    if top_vals.shape[1] > KEPT_TILES:
        following = torch.minimum(following, top_vals[:, KEPT_TILES])

    margin = search_margin(z_sq.sqrt(), z_resid, z_hnorm, c_resid.amax(), c_hnorm.amax(), c_sq.amax().sqrt(),
                           codes_sq.abs().amax(), dim)
    complete = following > top_vals[:, 0] + margin
    if rescan_all:
        complete = torch.zeros_like(complete)

    keys, redone = _fallback_scan(z, codes, codes_sq, ~complete, block_d)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    _rerank_kernel[(n,)](z, codes, codes_sq, kept_tiles, complete, keys, dist, idx, n_codes, dim, z.stride(0),
                         codes.stride(0), N_KEPT=KEPT_TILES, BLOCK_K=block_k, BLOCK_D=block_d,
                         num_warps=4 if block_k * block_d <= 8192 else 8)
    return dist, idx, redone


def _fallback_scan(z, codes, codes_sq, redo_mask, block_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (distance, index) keys of a full fp32 scan for the tokens in redo_mask, their count).

    Device-side throughout: the flagged tokens are listed in order by a cumsum and a searchsorted
    (redo[s] = the s-th flagged token), and the kernel reads their count from device memory.
    """
    n = z.shape[0]
    flagged_before = torch.cumsum(redo_mask, 0)  # flagged_before[t]: flagged tokens in 0..t
    redo = torch.searchsorted(flagged_before, torch.arange(1, n + 1, device=z.device))
    redo_count = flagged_before[-1]
    keys = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=z.device)
    n_tiles = triton.cdiv(codes.shape[0], FALLBACK_BLOCK_K)
    tiles_per_split = triton.cdiv(n_tiles, _splits_for(1, n_tiles, z.device))
    _fallback_kernel[(triton.cdiv(n_tiles, tiles_per_split),)](
        z, codes, codes_sq, redo, flagged_before[n - 1 :], keys, codes.shape[0], z.shape[1], z.stride(0),
        codes.stride(0), TILES_PER_SPLIT=tiles_per_split, BLOCK_M=FALLBACK_BLOCK_M, BLOCK_K=FALLBACK_BLOCK_K,
        BLOCK_D=block_d, CHUNK_D=min(FALLBACK_CHUNK_D, block_d), num_warps=FALLBACK_WARPS)
    return keys, redo_count


# Shared memory the tile pipeline may take: Hopper allows 227 KiB a block; leave the rest to the compiler.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_tiles(dim: int, block_m: int = 128, block_k: int = 64, num_stages: int = 4) -> dict:
    """The tuned tiles (d = 128 on the H100), shrunk for wide codes until the pipeline's fp16 buffers fit.

    The kernel holds one token tile and `num_stages` code tiles of the full padded width:
    (block_m + block_k * num_stages) * block_d * 2 bytes. Shrink the stages first (to 2), then
    the code tile (to 32), then the token tile (to 32).
    """
    block_d = max(16, _next_pow2(dim))

    def need() -> int:
        return (block_m + block_k * num_stages) * block_d * 2

    while need() > SHARED_MEMORY_BUDGET and num_stages > 2:
        num_stages -= 1
    while need() > SHARED_MEMORY_BUDGET and block_k > 32:
        block_k //= 2
    while need() > SHARED_MEMORY_BUDGET and block_m > 32:
        block_m //= 2
    if need() > SHARED_MEMORY_BUDGET:
        raise ValueError(f"code dimension {dim} is too wide for the fused search's tiles; use search_impl=torch")
    return {"block_m": block_m, "block_k": block_k, "num_warps": 4, "num_stages": num_stages}


def nearest_code_triton(z: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor | None = None,
                        fallbacks: torch.Tensor | None = None):
    """(min distance without ||z||^2 (fp32), argmin index (int64)) for each row of z over codes.

    `fallbacks`, a 0-d int64 tensor on z's device, gets the count of fully re-scanned tokens added.
    """
    dist, idx, redone = search_with_stats(z, codes, codes_sq, **fit_tiles(z.shape[1]))
    if fallbacks is not None:
        fallbacks.add_(redone)
    return dist, idx
