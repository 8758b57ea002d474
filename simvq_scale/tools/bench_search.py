"""Benchmark the exact nearest-code search: full matrix, chunked torch, fused Triton, sharded.

Single-process mode (default) times, side by side on one GPU and the same data:
  full        the reference SimVQ form sum z^2 + sum e^2 - 2 einsum, one N x K matrix (skipped where it
              would not fit: 'n/a (would need X GiB)')
  torch_fp32  search.nearest_code_torch (chunked, true fp32: the exact reference)
  torch_tf32  the same chunked loop with TF32 products      (a speed baseline, not exact)
  torch_bf16  the same chunked loop on bf16 operands         (a speed baseline, not exact)
  triton      search_triton.nearest_code_triton (fused, exact); triton@BMxBKxWxS picks the tile
              config (block_m, block_k, num_warps, num_stages)
  triton_rescan  every token through the fused search's exactness fallback, its full fp32 scan
              (what a token whose margin test fails costs; not in the default list)
For each: median time of --repeats CUDA-event-timed runs after warm-up, TFLOP/s counted as 2 N K d,
peak extra memory (max_memory_allocated delta), index mismatches against torch_fp32, 'wrong' tokens
(chosen code's fp64 distance worse than the fp64 optimum by more than a few fp32 ulps) and, for
triton, how many tokens the margin test sent to the fp32 fallback.

--sharded, under torchrun with P processes on P GPUs (NCCL): times sharded.sharded_nearest with
--tokens tokens per GPU and a codebook of --codebook-size rows split evenly; rank 0 prints the row.
--check --world-size P --device cpu: prints json.dumps(search_check.check_main(...)) as one line.

Examples:
  python tools/bench_search.py --tokens 16384 --codebook-size 262144 1048576 --out search.json
  torchrun --nproc_per_node 4 tools/bench_search.py --sharded --tokens 16384 --codebook-size 1048576
  python tools/bench_search.py --check --world-size 4 --device cpu --codebook-size 4096 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from simvq_scale.quant import search_triton
from simvq_scale.quant.search import SCORE_BLOCK_ELEMENTS, nearest_code_torch, squared_norms
from simvq_scale.tools.search_check import check_main, fp64_excess, fp64_optimum

ALL_IMPLS = ("full", "torch_fp32", "torch_tf32", "torch_bf16", "triton")


def full_matrix_search(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The SimVQ reference form: every distance at once, then argmin."""
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(codes**2, dim=1) - 2 * torch.einsum("bd,dn->bn", z, codes.T)
    return torch.argmin(d, dim=1)


def chunked_lowp_search(z: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor, precision: str,
                        chunk_size: int = 8192) -> torch.Tensor:
    """The chunked running-min loop of nearest_code_torch with TF32 or bf16 products (speed baselines)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        zl, cl = (z.bfloat16(), codes.bfloat16()) if precision == "bf16" else (z, codes)
        best = torch.full((z.shape[0],), float("inf"), device=z.device)
        best_idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        token_block = max(1, min(z.shape[0], SCORE_BLOCK_ELEMENTS // chunk_size))
        for t0 in range(0, z.shape[0], token_block):
            zt, bt, bi = zl[t0 : t0 + token_block], best[t0 : t0 + token_block], best_idx[t0 : t0 + token_block]
            for c0 in range(0, codes.shape[0], chunk_size):
                scores = torch.addmm(codes_sq[c0 : c0 + chunk_size].to(zl.dtype), zt, cl[c0 : c0 + chunk_size].T,
                                     alpha=-2.0)
                vals, idx = scores.float().min(dim=1)
                better = vals < bt
                bt.copy_(torch.where(better, vals, bt))
                bi.copy_(torch.where(better, idx + c0, bi))
        return best_idx
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def parse_triton_config(name: str, dim: int) -> dict:
    """search_with_stats keywords for an --impls entry: the tiles the trainer uses for this width (triton,
    triton_rescan, the latter sending every token to the fp32 fallback scan) or triton@BMxBKxWxS's own."""
    if name in ("triton", "triton_rescan"):
        return search_triton.fit_tiles(dim) | {"rescan_all": name == "triton_rescan"}
    try:
        block_m, block_k, num_warps, num_stages = (int(v) for v in name.removeprefix("triton@").split("x"))
    except ValueError as error:
        raise SystemExit(f"--impls {name!r}: expected triton@BMxBKxWARPSxSTAGES, e.g. triton@128x128x8x3") from error
    return {"block_m": block_m, "block_k": block_k, "num_warps": num_warps, "num_stages": num_stages}


def time_cuda(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median milliseconds over `repeats` CUDA-event-timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), times


def peak_extra_bytes(fn) -> tuple[int, object]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, result


def bench_one_size(args, codebook_size: int, device: torch.device) -> list[dict]:
    n, k, d = args.tokens, codebook_size, args.dim
    gen = torch.Generator(device=device).manual_seed(args.seed + k)
    z = torch.randn(n, d, device=device, generator=gen)
    codes = torch.randn(k, d, device=device, generator=gen)
    codes_sq = squared_norms(codes)
    print(f"[K={k}] exact reference (torch fp32) and fp64 optimum ...", flush=True)
    ref_idx = nearest_code_torch(z, codes, codes_sq)[1]
    optimum = fp64_optimum(z, codes)
    rows = []
    for impl in args.impls:
        row = {"N": n, "K": k, "d": d, "P": 1, "impl": impl, "device": torch.cuda.get_device_name(device)}
        stats = {}
        if impl == "full":
            need = 3 * n * k * 4
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                row["note"] = f"n/a (would need {need / 2**30:.1f} GiB)"
                print(f"[K={k}] {impl}: {row['note']}", flush=True)
                rows.append(row)
                continue
            fn = lambda: full_matrix_search(z, codes)  # noqa: E731
        elif impl == "torch_fp32":
            fn = lambda: nearest_code_torch(z, codes, codes_sq)[1]  # noqa: E731
        elif impl in ("torch_tf32", "torch_bf16"):
            fn = lambda p=impl.split("_")[1]: chunked_lowp_search(z, codes, codes_sq, p)  # noqa: E731
        elif impl.startswith("triton"):
            config = parse_triton_config(impl, d)

            def fn(config=config):
                dist, idx, stats["fallback"] = search_triton.search_with_stats(z, codes, codes_sq, **config)
                return idx
        else:
            raise SystemExit(f"unknown --impls entry {impl!r}; choose from {ALL_IMPLS}, triton_rescan or triton@BMxBKxWxS")
        print(f"[K={k}] {impl}: timing {args.repeats} repeats ...", flush=True)
        extra, idx = peak_extra_bytes(fn)
        median_ms, times = time_cuda(fn, args.repeats, args.warmup)
        excess, tolerance = fp64_excess(z, codes, idx, optimum)
        row.update({"time_ms": median_ms, "times_ms": times, "tflops": 2 * n * k * d / (median_ms * 1e-3) / 1e12,
                    "peak_extra_gib": extra / 2**30, "mismatches": int((idx != ref_idx).sum()),
                    "wrong": int((excess > tolerance).sum()), "max_excess": float(excess.max())})
        if "fallback" in stats:
            row["fallback"] = int(stats["fallback"])  # a device tensor: read once, after the timing
        rows.append(row)
    del z, codes, codes_sq
    torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'device':<22} {'N':>7} {'K':>9} {'d':>4} {'P':>2} {'impl':<22} {'ms':>9} {'TFLOP/s':>8} " \
           f"{'extraGiB':>8} {'mism':>5} {'wrong':>5} {'fallbk':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "time_ms" not in r:
            lines.append(f"{r.get('device', '')[:22]:<22} {r['N']:>7} {r['K']:>9} {r['d']:>4} {r['P']:>2} "
                         f"{r['impl']:<22} {r.get('note', 'n/a')}")
            continue
        lines.append(f"{r.get('device', '')[:22]:<22} {r['N']:>7} {r['K']:>9} {r['d']:>4} {r['P']:>2} "
                     f"{r['impl']:<22} {r['time_ms']:>9.2f} {r['tflops']:>8.1f} {r['peak_extra_gib']:>8.2f} "
                     f"{r.get('mismatches', 'n/a'):>5} {r.get('wrong', 'n/a'):>5} {r.get('fallback', '-'):>6}")
    return "\n".join(lines)


def run_single(args) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("the single-process benchmark needs CUDA (use --check for the CPU path)")
    device = torch.device("cuda")
    rows = []
    for k in args.codebook_size:
        rows.extend(bench_one_size(args, k, device))
    return rows


def run_sharded(args) -> list[dict]:
    """One row per codebook size: sharded_nearest over the torchrun world on NCCL."""
    import torch.distributed as dist

    from simvq_scale.quant.sharded import sharded_nearest

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    try:
        for k in args.codebook_size:
            if k % world:
                raise SystemExit(f"--codebook-size {k} is not divisible by the world size {world}")
            shard = k // world
            gen = torch.Generator(device=device).manual_seed(args.seed + k + rank)
            codes = torch.randn(shard, args.dim, device=device, generator=gen)
            z = torch.randn(args.tokens, args.dim, device=device, generator=gen)
            if rank == 0:
                print(f"[K={k} P={world}] timing {args.repeats} repeats ...", flush=True)
            fn = lambda: sharded_nearest(z, codes, rank * shard, dist.group.WORLD, impl=args.sharded_impl)  # noqa: E731
            extra, _ = peak_extra_bytes(fn)
            median_ms, times = time_cuda(fn, args.repeats, args.warmup)
            total_tokens = args.tokens * world
            rows.append({"N": args.tokens, "K": k, "d": args.dim, "P": world, "impl": f"sharded_{args.sharded_impl}",
                         "device": torch.cuda.get_device_name(device), "time_ms": median_ms, "times_ms": times,
                         "tflops": 2 * total_tokens * k * args.dim / (median_ms * 1e-3) / 1e12,
                         "peak_extra_gib": extra / 2**30})
            del codes, z
    finally:
        dist.destroy_process_group()
    return rows if rank == 0 else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens N (per GPU with --sharded)")
    parser.add_argument("--codebook-size", type=int, nargs="+", default=[262144, 1048576], help="codebook sizes K")
    parser.add_argument("--dim", type=int, default=128, help="code dimension d")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, caches)")
    parser.add_argument("--impls", nargs="+", default=list(ALL_IMPLS),
                        help=f"implementations: {' '.join(ALL_IMPLS)}, triton_rescan or triton@BMxBKxWARPSxSTAGES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--sharded", action="store_true", help="time sharded_nearest (launch under torchrun, NCCL)")
    parser.add_argument("--sharded-impl", default="auto", choices=("auto", "torch", "triton"),
                        help="local search used by each shard")
    parser.add_argument("--check", action="store_true", help="print search_check.check_main(...) as one JSON line")
    parser.add_argument("--world-size", type=int, default=2, help="processes for --check")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="--check runs on gloo CPU processes and needs --device cpu")
    args = parser.parse_args(argv)

    if args.check:
        if args.device != "cpu":
            raise SystemExit(f"--check runs spawned gloo CPU processes; pass --device cpu (got {args.device})")
        print(json.dumps(check_main(args.world_size, args.codebook_size[0], args.tokens, args.dim, args.seed)))
        return 0
    started = time.time()
    rows = run_sharded(args) if args.sharded else run_single(args)
    if not rows:
        return 0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"done in {time.time() - started:.0f} s")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
