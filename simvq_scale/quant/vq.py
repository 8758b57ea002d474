"""Vanilla VQ (VQ-VAE / taming-transformers): a trainable codebook, nearest code, straight-through.

Only the selected rows receive a gradient, which is exactly how codes die: a code
that is never nearest to any feature never moves (the collapse SimVQ addresses).
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.quant.base import Quantizer, QuantizerOutput, commitment_loss, straight_through
from simvq_scale.quant.search import nearest_code, squared_norms


def nearest_index(flat: torch.Tensor, codes: torch.Tensor, chunk_size: int, search_impl: str) -> torch.Tensor:
    """Index of the nearest row of `codes` (K, d) for each row of `flat` (N, d); no gradient."""
    codes = codes.detach()
    return nearest_code(flat.detach(), codes, squared_norms(codes), chunk_size, search_impl)[1]


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
        indices = nearest_index(flat, self.embedding.weight, self.chunk_size, self.search_impl)
        q = self.embedding(indices).float()
        loss = commitment_loss(flat, q, self.beta)
        z_q = straight_through(flat, q).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices).float()
