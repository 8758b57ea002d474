"""nearest_code: the one entry point of the exact search; it picks the fused kernel or the chunked torch search.

search.py (chunked fp32 torch search) and search_triton.py (fused kernel) know nothing of
each other or of this module.
"""

from __future__ import annotations

import torch

from simvq_scale.config import SEARCH_IMPLS
from simvq_scale.quant import search_triton
from simvq_scale.quant.search import nearest_code_torch


def nearest_code(
    z: torch.Tensor,
    codes: torch.Tensor,
    codes_sq: torch.Tensor | None = None,
    chunk_size: int = 8192,
    impl: str = "auto",
    fallbacks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min distance without ||z||^2 (fp32), argmin index (int64)) for each row of z (N, d) over codes (K, d).

    impl: auto = the fused kernel on CUDA, the torch search elsewhere; triton = the kernel or an
    error; torch = the chunked torch search. `fallbacks` (a 0-d int64 tensor on z's device) gets
    the fused search's count of fully re-scanned tokens added, on the device (no host sync).
    """
    if impl not in SEARCH_IMPLS:
        raise ValueError(f"search impl {impl!r} is not {'|'.join(SEARCH_IMPLS)}")
    if impl == "triton" or (impl == "auto" and z.is_cuda):
        if search_triton.runs_on(z.device):
            return search_triton.nearest_code_triton(z, codes, codes_sq, fallbacks)
        if impl == "triton":
            if search_triton.triton is None:
                raise RuntimeError("quantizer.search_impl=triton but Triton is not importable on this machine")
            raise RuntimeError(f"quantizer.search_impl=triton needs CUDA tensors, got device {z.device}")
    return nearest_code_torch(z, codes, codes_sq, chunk_size)
