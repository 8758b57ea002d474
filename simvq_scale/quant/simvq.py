"""SimVQ (Algorithm 1 of the paper): a frozen Gaussian codebook C reparameterised by one linear layer W.

Codes are C W^T (+ b). The nearest code is searched under no_grad over the whole
projected codebook; autograd then sees only the selected rows, q = C[idx] W^T + b,
so W (never the dead codes one by one) is what learns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from simvq_scale.quant.base import Quantizer, QuantizerOutput, commitment_loss, straight_through
from simvq_scale.quant.codebook import gaussian_rows
from simvq_scale.quant.search import exact_fp32, nearest_code, squared_norms


class LocalCodebook(nn.Module):
    """All K rows of C on this rank. `ShardedCodebook` (sharded.py) has the same two methods."""

    def __init__(self, codebook_size: int, dim: int, seed: int, trainable: bool = False,
                 chunk_size: int = 8192, search_impl: str = "auto"):
        super().__init__()
        self.codebook_size, self.chunk_size, self.search_impl = codebook_size, chunk_size, search_impl
        rows = gaussian_rows(seed, codebook_size, dim)
        if trainable:  # the paper's Table 4 ablation: C learns too (and collapse returns)
            self.weight = nn.Parameter(rows)
        else:  # regenerated from the seed on every rank; never broadcast or checkpointed
            self.register_buffer("weight", rows, persistent=False)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, project) -> torch.Tensor:
        """Indices of the nearest projected code, project(C), for each row of z (N, d)."""
        codes = project(self.weight)
        return nearest_code(z, codes, squared_norms(codes), self.chunk_size, self.search_impl)[1]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight[indices]


class SimVQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, seed: int = 0, bias: bool = True,
                 train_codebook: bool = False, chunk_size: int = 8192, search_impl: str = "auto",
                 codebook: nn.Module | None = None):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.codebook = codebook or LocalCodebook(codebook_size, dim, seed, train_codebook, chunk_size, search_impl)
        self.proj = nn.Linear(dim, dim, bias=bias)  # W: the only trained part of the codes

    @torch.no_grad()
    def init_from_tokens(self, tokens: torch.Tensor) -> None:
        """Data-dependent start (quantizer.init_from_data): W = diag(std * sqrt(d)), b = mean over every
        rank's tokens (N, d) (collective), so the codes C W^T + b, with C's entries of std d^-1/2, are
        distributed like the tokens, per dimension."""
        tokens = tokens.float()
        moments = torch.cat([tokens.sum(0), tokens.pow(2).sum(0), tokens.new_tensor([tokens.shape[0]])])
        if dist.is_initialized():
            dist.all_reduce(moments)
        count = moments[-1]
        mean = moments[: self.dim] / count
        std = (moments[self.dim : 2 * self.dim] / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        self.proj.weight.copy_(torch.diag(std * self.dim**0.5))
        if self.proj.bias is not None:
            self.proj.bias.copy_(mean)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        # fp32 whatever autocast is active, so forward's q and decode_indices agree bit for bit
        with exact_fp32(rows.device.type):
            return F.linear(rows.float(), self.proj.weight.float(),
                            None if self.proj.bias is None else self.proj.bias.float())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.reshape(-1, self.dim)
        indices = self.codebook.nearest(flat.detach(), self.project)
        q = self.project(self.codebook.lookup(indices))
        loss = commitment_loss(flat.float(), q, self.beta)
        z_q = straight_through(flat.float(), q).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project(self.codebook.lookup(indices.reshape(-1))).reshape(*indices.shape, self.dim)

    def projection_weight(self) -> torch.Tensor:
        return self.proj.weight
