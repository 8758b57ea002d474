"""Factorized codes (ViT-VQGAN, "VQGAN-FC"): search in a low-dimensional, l2-normalised space.

z (dim) -> Linear -> fc_dim -> l2-normalise; the codebook lives in fc_dim and is
l2-normalised too (nearest by Euclidean distance on the sphere = highest cosine);
the straight-through code is projected back up to dim. The VQ loss is taken in
the low-dimensional space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant.base import Quantizer, QuantizerOutput, commitment_loss, straight_through
from simvq_scale.quant.registry import register_quantizer
from simvq_scale.quant.vq import nearest_index


class FactorizedVQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, fc_dim: int = 8, beta: float = 0.25,
                 chunk_size: int = 8192, search_impl: str = "auto"):
        super().__init__()
        self.codebook_size, self.dim, self.fc_dim, self.beta = codebook_size, dim, fc_dim, beta
        self.chunk_size, self.search_impl = chunk_size, search_impl
        self.down = nn.Linear(dim, fc_dim)
        self.up = nn.Linear(fc_dim, dim)
        self.embedding = nn.Embedding(codebook_size, fc_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def low_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(indices).float(), dim=-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        low = F.normalize(self.down(z.reshape(-1, self.dim)).float(), dim=-1)
        indices = nearest_index(low, F.normalize(self.embedding.weight.float(), dim=-1),
                                self.chunk_size, self.search_impl, self.search_fallbacks)
        q_low = self.low_codes(indices)
        loss = commitment_loss(low, q_low, self.beta)
        z_q = self.up(straight_through(low, q_low)).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.up(self.low_codes(indices))

    def search_flops_per_token(self) -> float:
        return 2.0 * self.codebook_size * self.fc_dim  # the search runs in the low dimension


@register_quantizer("fc")
def build(cfg: QuantizerConfig) -> FactorizedVQ:
    return FactorizedVQ(cfg.codebook_size, cfg.dim, fc_dim=cfg.fc.low_dim, beta=cfg.beta,
                        chunk_size=cfg.search_chunk, search_impl=cfg.search_impl)
