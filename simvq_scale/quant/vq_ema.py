"""VQ-EMA (VQ-VAE appendix, Sonnet's VectorQuantizerEMA): codes are running means of their assigned features.

The codebook is not trained by the optimizer: in training mode every forward
moves each code to the exponential moving average of the features assigned to
it, with Laplace-smoothed cluster sizes. Counts and sums are all-reduced across
ranks first, so every rank applies the same update (the one a single process
would apply to the whole global batch). The buffers are persistent: they are the
model's state and must travel in checkpoints.
"""

from __future__ import annotations

import torch

from simvq_scale.config import QuantizerConfig
from simvq_scale.distributed import all_reduce_sum
from simvq_scale.quant.base import Quantizer, QuantizerOutput, straight_through
from simvq_scale.quant.registry import register_quantizer
from simvq_scale.quant.vq import nearest_index


class VQEMA(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 epsilon: float = 1e-5, chunk_size: int = 8192, search_impl: str = "auto"):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"VQ-EMA decay={decay} must be in (0, 1)")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.decay, self.epsilon = decay, epsilon
        self.chunk_size, self.search_impl = chunk_size, search_impl
        embedding = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)
        # each code starts as the mean of one virtual sample of itself, so sum / size == embedding from step 0;
        # a zero size would divide an unused code's sum by ~epsilon and throw it far away on the first update
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", embedding.clone())

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, indices, flat.float())
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps unused codes from dividing by zero while preserving the total count
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embedding.copy_(self.embedding_sum / smoothed.unsqueeze(1))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.reshape(-1, self.dim).float()
        indices = nearest_index(flat, self.embedding, self.chunk_size, self.search_impl, self.search_fallbacks)
        if self.training:
            self.ema_update(flat.detach(), indices)
        # looked up after the update, so decode_indices(indices) reproduces z_q with the state checkpointed now
        q = self.embedding[indices]
        loss = self.beta * (flat - q).pow(2).mean()
        z_q = straight_through(flat, q).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding[indices]


@register_quantizer("vq_ema")
def build(cfg: QuantizerConfig) -> VQEMA:
    return VQEMA(cfg.codebook_size, cfg.dim, beta=cfg.beta, decay=cfg.vq_ema.decay, epsilon=cfg.vq_ema.epsilon,
                 chunk_size=cfg.search_chunk, search_impl=cfg.search_impl)
