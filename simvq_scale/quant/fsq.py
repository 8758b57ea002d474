"""FSQ (Mentzer et al., "Finite Scalar Quantization"): round each of a few bounded channels to a fixed grid.

z (dim) -> Linear -> len(levels) channels; channel i is squashed by a shifted tanh
into (-L_i/2, L_i/2) and rounded (straight-through) to one of L_i integers,
then scaled to [-1, 1] and projected back up. The implicit codebook is the grid
itself: K = prod(levels), index = the mixed-radix number of the digits. No
codebook parameters and no loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant.base import Quantizer, QuantizerOutput, straight_through
from simvq_scale.quant.registry import register_quantizer

BOUND_EPS = 1e-3  # keeps tanh's range just inside +-L/2 so rounding never reaches an extra level


class FSQ(Quantizer):
    def __init__(self, levels: list[int], dim: int):
        super().__init__()
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels={levels} needs at least one level and every level >= 2")
        self.levels_list = list(levels)
        self.codebook_size, self.dim = math.prod(levels), dim
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0), persistent=False)
        self.register_buffer("half_width", torch.tensor(levels) // 2, persistent=False)
        self.down = nn.Linear(dim, len(levels))
        self.up = nn.Linear(len(levels), dim)

    def search_flops_per_token(self) -> float:
        return 0.0  # codes are rounded, not searched

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """Squash to (-L/2, L/2) for odd L, (-L/2, L/2 - 1) for even L (L integers after rounding)."""
        half_l = (self.levels - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(x + shift) * half_l - offset

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Grid codes in [-1, 1] with the straight-through gradient of the bounded x."""
        bounded = self.bound(x.float())
        return straight_through(bounded, bounded.round()) / self.half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes * self.half_width + self.half_width).round().long()
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels
        return (digits - self.half_width).float() / self.half_width

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        codes = self.quantize(self.down(z))
        indices = self.codes_to_indices(codes.detach())
        z_q = self.up(codes).to(z.dtype)
        return QuantizerOutput(z_q, indices, torch.zeros((), device=z.device))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.up(self.indices_to_codes(indices))


@register_quantizer("fsq")
def build(cfg: QuantizerConfig) -> FSQ:
    return FSQ(cfg.fsq.levels, cfg.dim)  # prod(levels) == codebook_size: checked by QuantizerConfig.validate
