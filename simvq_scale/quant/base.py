"""The one interface every quantizer implements, so one trainer can compare them."""

from __future__ import annotations

import abc

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # same shape as the input, carrying the straight-through gradient
    indices: torch.Tensor  # int64, the input's shape without the last (feature) dimension
    loss: torch.Tensor  # scalar: commitment/codebook (+ entropy) terms, already weighted
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class Quantizer(nn.Module, abc.ABC):
    """forward(z: (..., dim)) -> QuantizerOutput; decode_indices(indices) -> (..., dim).

    `search_fallbacks` (0-d int64 buffer, not checkpointed) counts, on the device, the tokens the
    fused search had to re-scan in full fp32 because its margin test could not prove the fast answer;
    read it at log steps only (reading is a host sync). It stays 0 for kinds without a code search.
    A kind with `init_from_data` set wants init_from_tokens(tokens) called once before training.
    """

    codebook_size: int
    dim: int
    init_from_data: bool = False

    def __init__(self):
        super().__init__()
        self.register_buffer("search_fallbacks", torch.zeros((), dtype=torch.long), persistent=False)

    def init_from_tokens(self, tokens: torch.Tensor) -> None:
        """Data-dependent start from the first tokens (N, dim) of every rank (collective)."""
        raise TypeError(f"{type(self).__name__} has no data-dependent start")

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize the last dimension of z; z_q carries the straight-through gradient."""

    @abc.abstractmethod
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of `indices`, equal to what forward returned as z_q for them."""

    def search_flops_per_token(self) -> float:
        """FLOPs of comparing one token with every code, counted in the trainer's MFU: the distance products of a
        nearest-code search in `dim` (SimVQ, LC, VQ, VQ-EMA); kinds that compare elsewhere or not at all say so."""
        return 2.0 * self.codebook_size * self.dim

    def projection_weight(self) -> torch.Tensor | None:
        """The learned linear map of a reparameterised codebook (SimVQ's W), whose spectrum is monitored;
        None for quantizers without one."""
        return None


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value q, gradient of the identity to z."""
    # q + (z - sg(z)) is q bit for bit (z - sg(z) is exactly 0); z + sg(q - z) rounds, so
    # decode_indices would differ from forward in the last bit. Same gradients either way.
    return q.detach() + (z - z.detach())


def commitment_loss(z: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * |z - sg(q)|^2 (moves the encoder) + |sg(z) - q|^2 (moves the codes)."""
    return beta * (z - q.detach()).pow(2).mean() + (z.detach() - q).pow(2).mean()
