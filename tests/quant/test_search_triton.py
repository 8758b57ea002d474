"""The fused Triton search returns the exact fp32 answer: same index as the torch reference on clear
margins, lowest index on planted exact ties, never worse than the fp64 optimum beyond fp32 rounding.

CPU: the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before Triton
is imported, and must not leak into other tests). GPU (marked gpu): real sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simvq_scale.quant import search_triton
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.search import nearest_code_torch
from simvq_scale.tools.search_check import fp64_excess
from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(search_triton.triton is None, reason="Triton is not installed")


def make_case(kind: str, n: int, k: int, d: int, seed: int, device: str = "cpu"):
    """(z, codes, planted) where planted maps a token to the index it must get exactly (or is empty)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randn(k, d, generator=gen)
    z = torch.randn(n, d, generator=gen)
    planted: dict[int, int] = {}
    if kind == "duplicates":
        # 1-6 copies of row t, k/7 rows apart (so in different tiles: with 4+ copies at least 5 tiles
        # hold the best distance, more than the four kept, so the margin test must send those tokens
        # to the fallback); tokens sit on the row.
        for t, src in enumerate(range(0, min(n, k // 7))):
            for c in range(1 + t % 6):
                codes[(c + 1) * (k // 7) + t] = codes[src]
            z[t] = codes[src] + 1e-3 * torch.randn(d, generator=gen)
            planted[t] = src
    elif kind == "near_ties":
        # Token equidistant (in exact arithmetic) from two codes: a and a + delta, z on the bisector,
        # nudged by a few fp32 ulps of the distance towards one side or the other.
        for t in range(n):
            a, b = (t * 7) % k, (t * 13 + 5) % k
            if a == b:
                continue
            codes[b] = codes[a] + 1e-2 * torch.randn(d, generator=gen)
            mid = 0.5 * (codes[a] + codes[b])
            direction = codes[b] - codes[a]
            z[t] = mid + (t % 5 - 2) * 1e-7 * direction / direction.norm()
    elif kind == "huge_norms":
        codes[: k // 10] *= 1e4
        codes[k // 10 : k // 5] *= 1e-3
        z *= 3.0
    elif kind != "random":
        raise ValueError(f"unknown case kind {kind!r}")
    return z.to(device), codes.to(device), planted


def check_case(kind: str, n: int, k: int, d: int, seed: int, device: str = "cpu", rescan_all: bool = False) -> dict:
    z, codes, planted = make_case(kind, n, k, d, seed, device)
    dist, idx, fallback = search_triton.search_with_stats(z, codes, **search_triton.fit_tiles(d),
                                                          rescan_all=rescan_all)
    ref_dist, ref_idx = nearest_code_torch(z, codes)
    excess, tolerance = fp64_excess(z, codes, idx)
    planted_tokens = sorted(planted)
    return {
        "kind": f"rescan-{kind}" if rescan_all else kind, "n": n, "k": k, "d": d, "fallback": int(fallback),
        "mismatches": int((idx != ref_idx).sum()),
        "wrong": int((excess > tolerance).sum()),
        "planted_wrong": int(sum(int(idx[t]) != planted[t] for t in planted_tokens)),
        "planted_ref_wrong": int(sum(int(ref_idx[t]) != planted[t] for t in planted_tokens)),
        "planted": len(planted_tokens),
        "dist_gap": float(((dist.double() - ref_dist.double()).abs() / tolerance).max()),
        "idx_dtype": str(idx.dtype), "dist_dtype": str(dist.dtype), "in_range": bool(((idx >= 0) & (idx < k)).all()),
    }


INTERPRET_CASES = [
    ("random", 96, 777, 32, 1),
    ("random", 64, 300, 16, 2),
    ("duplicates", 40, 640, 32, 3),
    ("near_ties", 64, 500, 32, 4),
    ("huge_norms", 64, 700, 32, 5),
    ("random", 40, 333, 512, 6),  # audio width: smaller tiles, fewer stages
]
# Every token through the fallback's full fp32 scan (search_with_stats(rescan_all=True)).
RESCAN_CASES = [("duplicates", 40, 640, 32, 3), ("huge_norms", 64, 700, 32, 5), ("random", 24, 333, 512, 6)]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Run every CPU case in one TRITON_INTERPRET=1 subprocess (one interpreter start for all)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__, "--interpret-cases"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["kind"], r["n"], r["k"], r["d"]) if "n" in r else r["kind"]: r for r in results}


# aten ops that read tensor values back to the host: each is a device sync on CUDA
HOST_READ_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default",
                 "aten.masked_select.default", "aten.is_nonzero.default", "aten.equal.default", "aten.item.default",
                 "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
                 "aten.repeat_interleave.Tensor"}


def _from_interpreter() -> bool:
    """Called by Triton's interpreter, whose copies of the arguments stand in for a kernel launch."""
    return any("triton/runtime/interpreter" in frame.filename for frame in traceback.extract_stack())


class HostReadRecorder(TorchDispatchMode):
    """Records every read of tensor values by the host: .item(), int(), float(), bool(), nonzero,
    boolean-mask indexing (aten ops seen by this dispatch mode) and .tolist(), .numpy(), .cpu()
    (which bypass the dispatcher, so they are wrapped while the recorder is active)."""

    WRAPPED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        mask_index = name.startswith("aten.index") and any(
            isinstance(leaf, torch.Tensor) and leaf.dtype == torch.bool for leaf in tree_leaves(args[1:]))
        if (name in HOST_READ_OPS or mask_index) and not _from_interpreter():
            self.reads.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.originals = {name: getattr(torch.Tensor, name) for name in self.WRAPPED}
        for name, original in self.originals.items():
            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                if not _from_interpreter():
                    self.reads.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def host_reads_case() -> dict:
    """The interpreted search with planted duplicates (the fallback runs), under the recorder; and the
    recorder's own check on the reads the former fallback made."""
    z, codes, _ = make_case("duplicates", 40, 640, 32, 3)
    fallbacks = torch.zeros((), dtype=torch.long)
    with HostReadRecorder() as recorder:
        _, idx = nearest_code(z, codes, impl="triton", fallbacks=fallbacks)
        nearest_code(z, codes, impl="triton", fallbacks=fallbacks)
    with HostReadRecorder() as probe:
        redo = (z[:, 0] > 0).nonzero().squeeze(1)
        int(redo.numel() and redo.max()), z[z[:, 0] > 0], redo.tolist()
    per_call = search_triton.search_with_stats(z, codes, **search_triton.fit_tiles(32))[2]
    return {"kind": "host_reads", "reads": recorder.reads, "probe": probe.reads, "fallbacks": int(fallbacks),
            "per_call": int(per_call), "same_indices": bool(torch.equal(idx, nearest_code_torch(z, codes)[1]))}


@pytest.mark.slow
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in INTERPRET_CASES])
def test_interpreted_kernel_is_exact(interpreted, case):
    result = interpreted[case[:4]]
    assert result["idx_dtype"] == "torch.int64" and result["dist_dtype"] == "torch.float32"
    assert result["in_range"]
    assert result["wrong"] == 0, result
    assert result["planted_wrong"] == 0, result
    assert result["dist_gap"] <= 1.0, result
    if case[0] in ("random", "huge_norms"):
        assert result["mismatches"] == 0, result
    if case[0] == "random":
        assert result["fallback"] == 0, result  # clear margins: the fast path alone decides


@pytest.mark.slow
def test_interpreted_duplicates_use_fallback_and_lowest_index(interpreted):
    result = interpreted[("duplicates", 40, 640, 32)]
    # Tokens with 4-6 copies of their row fill more tiles than are kept: the margin test must refuse them.
    assert result["fallback"] >= sum(1 for t in range(result["planted"]) if t % 6 >= 3), result
    assert result["planted"] == 40 and result["planted_wrong"] == 0 and result["planted_ref_wrong"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", RESCAN_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in RESCAN_CASES])
def test_interpreted_full_fp32_scan_is_exact_on_every_token(interpreted, case):
    result = interpreted[(f"rescan-{case[0]}", *case[1:4])]
    assert result["fallback"] == case[1], result  # every token went through the scan
    assert result["wrong"] == 0 and result["planted_wrong"] == 0 and result["in_range"], result
    assert result["dist_gap"] <= 1.0, result
    if case[0] != "duplicates":
        assert result["mismatches"] == 0, result


@pytest.mark.slow
def test_interpreted_search_reads_nothing_back_to_the_host(interpreted):
    result = interpreted["host_reads"]
    # the recorder sees the reads the former fallback made (nonzero, int(), mask indexing, tolist) ...
    assert result["probe"] == ["aten.nonzero.default", "aten._local_scalar_dense.default", "aten.index.Tensor",
                               "Tensor.tolist"], result
    # ... and none in two searches whose fallback re-scanned tokens, counted on the device
    assert result["reads"] == [], result
    assert result["per_call"] > 0 and result["fallbacks"] == 2 * result["per_call"], result
    assert result["same_indices"], result


def test_margin_grows_with_rounding_and_norms():
    one = torch.ones(3)
    base = search_triton.search_margin(one, 0.01 * one, one, 0.01, 1.0, 1.0, 1.0, 32)
    assert (search_triton.search_margin(one, 0.02 * one, one, 0.01, 1.0, 1.0, 1.0, 32) > base).all()
    assert (search_triton.search_margin(one, 0.01 * one, one, 0.01, 1.0, 10.0, 100.0, 32) > base).all()
    assert (base > 0).all()


def test_tiles_fit_shared_memory_for_every_width():
    for dim in (16, 128, 256, 512, 1000, 1024):
        t = search_triton.fit_tiles(dim)
        block_d = max(16, 1 << (dim - 1).bit_length())
        assert (t["block_m"] + t["block_k"] * t["num_stages"]) * block_d * 2 <= search_triton.SHARED_MEMORY_BUDGET
    assert search_triton.fit_tiles(128) == {"block_m": 128, "block_k": 64, "num_warps": 4, "num_stages": 4}
    with pytest.raises(ValueError, match="4096"):
        search_triton.fit_tiles(4096)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 7\)"):
        search_triton.search_with_stats(torch.zeros(4, 8), torch.zeros(5, 7))
    with pytest.raises(ValueError, match="codes_sq must have shape"):
        search_triton.search_with_stats(torch.zeros(4, 8), torch.zeros(5, 8), torch.zeros(4))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,n,k,d", [("random", 4096, 100_003, 128), ("random", 1000, 5_000, 64),
                                        ("duplicates", 512, 65_536, 128), ("near_ties", 2048, 50_000, 128),
                                        ("huge_norms", 2048, 70_001, 128), ("random", 1500, 262_144, 512)])
def test_gpu_fused_search_is_exact(kind, n, k, d):
    result = check_case(kind, n, k, d, seed=11, device="cuda")
    assert result["wrong"] == 0 and result["planted_wrong"] == 0 and result["in_range"], result
    if kind in ("random", "huge_norms"):
        assert result["mismatches"] == 0, result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,n,k,d", [("random", 4096, 100_003, 128), ("duplicates", 512, 65_536, 128),
                                        ("huge_norms", 2048, 70_001, 128), ("random", 1500, 262_144, 512)])
def test_gpu_full_fp32_scan_is_exact_on_every_token(kind, n, k, d):
    result = check_case(kind, n, k, d, seed=11, device="cuda", rescan_all=True)
    assert result["fallback"] == n, result
    assert result["wrong"] == 0 and result["planted_wrong"] == 0 and result["in_range"], result
    if kind != "duplicates":
        assert result["mismatches"] == 0, result


@pytest.mark.gpu
@gpu
def test_gpu_dispatch_uses_the_kernel_and_matches():
    z, codes, _ = make_case("random", 777, 33_333, 128, seed=3, device="cuda")
    dist, idx = nearest_code(z, codes, impl="triton")
    ref_dist, ref_idx = nearest_code_torch(z, codes)
    assert torch.equal(idx, ref_idx)
    _, tolerance = fp64_excess(z, codes, idx)
    assert ((dist.double() - ref_dist.double()).abs() <= tolerance).all()


@pytest.mark.gpu
@gpu
def test_gpu_search_with_fallback_never_syncs_with_the_host():
    z, codes, planted = make_case("duplicates", 512, 65_536, 128, seed=3, device="cuda")
    fallbacks = torch.zeros((), dtype=torch.long, device="cuda")
    nearest_code(z, codes, impl="triton", fallbacks=fallbacks)  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        _, idx = nearest_code(z, codes, impl="triton", fallbacks=fallbacks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(int(idx[t]) == src for t, src in planted.items())
    assert int(fallbacks) > 0 and int(fallbacks) % 2 == 0  # two equal calls, each with re-scanned tokens


def dot_in_the_gpus_order(self, a, b, acc, input_precision, max_num_imprecise_acc):
    """The interpreter's tl.dot, summed as the GPU's CUDA-core dot sums: term by term in the order of the
    inner dimension, the same sequence for every output element (Triton's FMA lowering), so equal codes
    score equal distances. Numpy's matmul, which the interpreter calls, hands edge columns to other BLAS
    kernels and scored two copies of a code differently, which no GPU does. (Products here are rounded
    before the add, where the GPU fuses them; fp16 products are exact in fp32 either way.)"""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    left, right = a.data.astype(np.float32), b.data.astype(np.float32)
    total = acc.data.astype(np.float32)
    for k in range(left.shape[-1]):
        total = total + left[..., :, k : k + 1] * right[..., k : k + 1, :]
    return TensorHandle(total.astype(acc.data.dtype), acc.dtype.scalar)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-cases"]:
    from triton.runtime.interpreter import InterpreterBuilder

    InterpreterBuilder.create_dot = dot_in_the_gpus_order
    for case in INTERPRET_CASES:
        print(json.dumps(check_case(*case)), flush=True)
    for case in RESCAN_CASES:
        print(json.dumps(check_case(*case, rescan_all=True)), flush=True)
    print(json.dumps(host_reads_case()), flush=True)
