"""Tokens standardized per dimension by running moments of the training tokens, before the code search.

Why: a SEANet encoder's tokens drift together while the decoder is still learning the average spectrum
(their spread falls far below the codes' spacing), and every token then picks one code until the decoder
starts to use them. Standardized tokens keep unit spread per dimension whatever the encoder's scale, so the
codes (C W^T + b, which W learns as before) keep covering them. The moments are constants to autograd and the
same in training and inference (as BatchNorm's running statistics in eval mode): a token's code never
depends on the other samples of its batch, and the export carries the moments as buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.distributed import all_reduce_sum


class RunningStandardizer(nn.Module):
    """(z - mean) / sqrt(var + eps) per dimension; `update(tokens)` folds in a batch's moments (collective)."""

    def __init__(self, dim: int, momentum: float, eps: float = 1e-12):
        super().__init__()
        self.dim, self.momentum, self.eps = dim, momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, tokens: torch.Tensor) -> None:
        """Fold in the moments of every rank's tokens (N, dim): the first update takes them as they are,
        later ones by `momentum`, decided on the device (no host sync). Two passes (mean, then the squares
        about it): speech tokens sit on a large common offset, where E[z^2] - E[z]^2 cancels to noise."""
        tokens = tokens.detach().float()
        totals = all_reduce_sum(torch.cat([tokens.sum(0), tokens.new_tensor([tokens.shape[0]])]))
        mean = totals[:-1] / totals[-1]
        var = all_reduce_sum((tokens - mean).pow(2).sum(0)) / totals[-1]
        weight = torch.where(self.updates == 0, 1.0, self.momentum).to(mean)
        self.mean.lerp_(mean, weight)
        self.var.lerp_(var, weight)
        self.updates += 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mean) * torch.rsqrt(self.var + self.eps)
