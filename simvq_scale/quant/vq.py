"""Vanilla VQ (VQ-VAE / taming-transformers): a trainable codebook, nearest code, straight-through.

Only the selected rows receive a gradient, which is exactly how codes die: a code
that is never nearest to any feature never moves (the collapse SimVQ addresses).
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant.base import Quantizer, QuantizerOutput, commitment_loss, straight_through
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.registry import register_quantizer
from simvq_scale.quant.search import squared_norms


@torch.no_grad()
def nearest_index(flat: torch.Tensor, codes: torch.Tensor, chunk_size: int, search_impl: str,
                  fallbacks: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest row of `codes` (K, d) for each row of `flat` (N, d); no gradient.

    Searched in the frame centred on the codes' mean: a common shift leaves every distance as it
    is, and this one keeps a shared offset of tokens and codes out of the fp32 arithmetic, where
    ||c||^2 - 2 z.c would cancel it (search.py). The mean costs one pass over the codes.
    """
    codes = codes.detach().float()
    origin = codes.mean(dim=0)
    centred = codes - origin
    return nearest_code(flat.detach().float() - origin, centred, squared_norms(centred), chunk_size, search_impl,
                        fallbacks)[1]


class VQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, chunk_size: int = 8192,
                 search_impl: str = "auto"):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.chunk_size, self.search_impl = chunk_size, search_impl
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming's init

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.reshape(-1, self.dim).float()
        indices = nearest_index(flat, self.embedding.weight, self.chunk_size, self.search_impl, self.search_fallbacks)
        q = self.embedding(indices).float()
        loss = commitment_loss(flat, q, self.beta)
        z_q = straight_through(flat, q).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices).float()


@register_quantizer("vq")
def build(cfg: QuantizerConfig) -> VQ:
    return VQ(cfg.codebook_size, cfg.dim, beta=cfg.beta, chunk_size=cfg.search_chunk, search_impl=cfg.search_impl)
