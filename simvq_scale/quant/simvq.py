"""SimVQ (Algorithm 1 of the paper): a frozen Gaussian codebook C reparameterised by one linear layer W.

Codes are C W^T (+ b). The nearest code is searched under no_grad over the whole
projected codebook; autograd then sees only the selected rows, q = C[idx] W^T + b,
so W (never the dead codes one by one) is what learns.

The search runs in the frame centred on b: ||z - (c W^T + b)||^2 = ||(z - b) - c W^T||^2,
so z - b is searched against the bias-free codes C W^T. The distances are the same; the
fp32 arithmetic no longer sees a common offset of tokens and codes (speech tokens sit on
one), which otherwise cancels in ||c||^2 - 2 z.c and picks farther codes. C is zero-mean
by construction, so b is the codes' centre. q itself is computed as before (C[idx] W^T + b),
so decode_indices(idx) still equals forward's z_q bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.distributed import all_reduce_sum
from simvq_scale.quant.base import Quantizer, QuantizerOutput, commitment_loss, straight_through
from simvq_scale.quant.codebook import gaussian_rows
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.registry import register_quantizer
from simvq_scale.quant.search import exact_fp32, squared_norms


class LocalCodebook(nn.Module):
    """All K rows of C on this rank (`weight`), a search over codes projected from them, and a lookup.

    `ShardedCodebook` (sharded.py) has the same interface for a codebook split across ranks.
    """

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
    def search(self, z: torch.Tensor, codes: torch.Tensor, fallbacks: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the nearest row of `codes` (my rows as projected by the caller, in z's frame) per row of z."""
        return nearest_code(z, codes, squared_norms(codes), self.chunk_size, self.search_impl, fallbacks)[1]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight[indices]


class SimVQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, seed: int = 0, bias: bool = True,
                 train_codebook: bool = False, chunk_size: int = 8192, search_impl: str = "auto",
                 codebook: nn.Module | None = None, init_from_data: bool = False):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.init_from_data = init_from_data
        self.codebook = codebook or LocalCodebook(codebook_size, dim, seed, train_codebook, chunk_size, search_impl)
        self.proj = nn.Linear(dim, dim, bias=bias)  # W: the only trained part of the codes

    @torch.no_grad()
    def init_from_tokens(self, tokens: torch.Tensor) -> None:
        """Data-dependent start (quantizer.simvq.init_from_data): W = diag(std * sqrt(d)), b = mean over every
        rank's tokens (N, d) (collective), so the codes C W^T + b, with C's entries of std d^-1/2, are
        distributed like the tokens, per dimension."""
        tokens = tokens.float()
        moments = torch.cat([tokens.sum(0), tokens.pow(2).sum(0), tokens.new_tensor([tokens.shape[0]])])
        all_reduce_sum(moments)
        count = moments[-1]
        mean = moments[: self.dim] / count
        std = (moments[self.dim : 2 * self.dim] / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        self.proj.weight.copy_(torch.diag(std * self.dim**0.5))
        if self.proj.bias is not None:
            self.proj.bias.copy_(mean)

    def project(self, rows: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """rows W^T (+ b) in fp32 whatever autocast is active, so forward's q and decode_indices agree bit for bit."""
        with exact_fp32(rows.device.type):
            b = self.proj.bias.float() if bias and self.proj.bias is not None else None
            return F.linear(rows.float(), self.proj.weight.float(), b)

    @torch.no_grad()
    def search_frame(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(my codes as the search sees them, the origin subtracted from the tokens): C W^T and b (module docstring)."""
        origin = None if self.proj.bias is None else self.proj.bias.float()
        return self.project(self.codebook.weight, bias=False), origin

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Global index of the nearest code for each row of flat (N, dim); collective for a sharded codebook."""
        codes, origin = self.search_frame()
        tokens = flat.detach().float()
        return self.codebook.search(tokens if origin is None else tokens - origin, codes, self.search_fallbacks)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.reshape(-1, self.dim)
        indices = self.nearest(flat)
        q = self.project(self.codebook.lookup(indices))
        loss = commitment_loss(flat.float(), q, self.beta)
        z_q = straight_through(flat.float(), q).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q, indices.reshape(z.shape[:-1]), loss)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project(self.codebook.lookup(indices.reshape(-1))).reshape(*indices.shape, self.dim)

    def projection_weight(self) -> torch.Tensor:
        return self.proj.weight


def sharded_codebook(cfg: QuantizerConfig) -> nn.Module | None:
    """The frozen codebook split over the ranks of `cfg.shard.group`, or None when it is replicated.

    Must run on every rank in the same order (building the shard group is a collective).
    """
    if cfg.shard.group == "none":
        return None
    from simvq_scale.distributed import codebook_shard_group
    from simvq_scale.quant.sharded import ShardedCodebook

    group, group_rank, group_size = codebook_shard_group(cfg.shard.group)
    return ShardedCodebook(cfg.codebook_size, cfg.dim, cfg.seed, group, group_rank, group_size,
                           cfg.search_chunk, cfg.search_impl)


@register_quantizer("simvq")
def build(cfg: QuantizerConfig) -> SimVQ:
    o = cfg.simvq
    return SimVQ(cfg.codebook_size, cfg.dim, beta=cfg.beta, seed=cfg.seed, bias=o.bias,
                 train_codebook=o.train_codebook, chunk_size=cfg.search_chunk, search_impl=cfg.search_impl,
                 codebook=sharded_codebook(cfg), init_from_data=o.init_from_data)
