"""LFQ (MAGVIT-v2, "Language Model Beats Diffusion"): each of log2(K) channels is quantized to its sign.

z (dim) -> Linear -> bits channels -> sign in {-1, +1} (straight-through) -> Linear
back to dim. The implicit codebook is {-1, +1}^bits; the index is the bits read as
a binary number, most significant first.

The entropy loss asks each token to be confident (low per-sample entropy) and the
batch to use all codes (high entropy of the batch-averaged code distribution),
with p(c | x) = softmax_c(2 x.c / T) over the codes c. That distribution is a
product over bits, p(c_i = +1 | x) = sigmoid(4 x_i / T), so the per-sample
entropy is exactly the sum of per-bit entropies. The batch-averaged distribution
is not a product: it is computed exactly over all 2^bits codes when
bits <= EXACT_ENTROPY_MAX_BITS, and with the factorized per-bit form (an upper
bound) beyond that, where a (tokens x 2^bits) table would not fit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant.base import Quantizer, QuantizerOutput, straight_through
from simvq_scale.quant.registry import register_quantizer

EXACT_ENTROPY_MAX_BITS = 16
ENTROPY_TOKEN_CHUNK = 1024  # tokens per block of the exact (tokens x 2^bits) softmax


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=dim)


def _bit_entropy(p_plus: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(p_plus), summed over the last (bit) dimension."""
    return _entropy(torch.stack([p_plus, 1 - p_plus], dim=-1)).sum(dim=-1)


class LFQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 beta: float = 0.25, temperature: float = 0.01):
        super().__init__()
        bits = int(round(math.log2(codebook_size))) if codebook_size > 1 else 0
        if codebook_size < 2 or 2**bits != codebook_size:
            raise ValueError(f"LFQ needs codebook_size to be a power of 2 (>= 2), got {codebook_size}")
        self.codebook_size, self.dim, self.bits = codebook_size, dim, bits
        self.entropy_weight, self.diversity_gamma = entropy_weight, diversity_gamma
        self.beta, self.temperature = beta, temperature  # T = 0.01: MAGVIT-v2 / lucidrains' inv_temperature 100
        self.register_buffer("bit_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        self.down = nn.Linear(dim, bits)
        self.up = nn.Linear(bits, dim)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes > 0).long() * self.bit_values).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        bits_set = (indices.unsqueeze(-1) // self.bit_values) % 2
        return bits_set.float() * 2 - 1

    def search_flops_per_token(self) -> float:
        # codes are signs, not searched; the exact batch entropy compares each token with every code
        return 2.0 * self.codebook_size * self.bits if self.bits <= EXACT_ENTROPY_MAX_BITS else 0.0

    def entropies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-sample entropy, entropy of the batch-averaged code distribution), in nats."""
        p_plus = torch.sigmoid(4 * x / self.temperature)
        per_sample = _bit_entropy(p_plus).mean()
        if self.bits > EXACT_ENTROPY_MAX_BITS:
            return per_sample, _bit_entropy(p_plus.mean(dim=0))
        all_codes = self.indices_to_codes(torch.arange(self.codebook_size, device=x.device))
        avg = torch.zeros(self.codebook_size, device=x.device)
        for start in range(0, x.shape[0], ENTROPY_TOKEN_CHUNK):
            logits = 2 * x[start : start + ENTROPY_TOKEN_CHUNK] @ all_codes.T / self.temperature
            avg = avg + F.softmax(logits, dim=-1).sum(dim=0)
        return per_sample, _entropy(avg / x.shape[0])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x = self.down(z.reshape(-1, self.dim)).float()
        signs = torch.where(x > 0, 1.0, -1.0)
        codes = straight_through(x, signs)
        per_sample, codebook = self.entropies(x)
        commitment = (x - signs).pow(2).mean()
        loss = self.entropy_weight * (per_sample - self.diversity_gamma * codebook) + self.beta * commitment
        z_q = self.up(codes).to(z.dtype).reshape(z.shape)
        stats = {"per_sample_entropy": per_sample.detach(), "codebook_entropy": codebook.detach()}
        return QuantizerOutput(z_q, self.codes_to_indices(signs).reshape(z.shape[:-1]), loss, stats)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.up(self.indices_to_codes(indices))


@register_quantizer("lfq")
def build(cfg: QuantizerConfig) -> LFQ:
    return LFQ(cfg.codebook_size, cfg.dim, entropy_weight=cfg.lfq.entropy_weight,
               diversity_gamma=cfg.lfq.diversity_gamma, beta=cfg.beta)
