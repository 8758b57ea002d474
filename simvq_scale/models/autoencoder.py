"""Encoder -> quantizer -> decoder, for any modality: the layout glue between them.

Encoders and decoders are channel-first (B, d, *spatial); quantizers work on channel-last
tokens (..., d). The model takes a quantizer, it never builds one.
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.quant.base import Quantizer, QuantizerOutput


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if z.shape[1] != self.quantizer.dim:
            raise ValueError(f"encoder gives {z.shape[1]} channels but the quantizer's dim is {self.quantizer.dim}")
        return z.movedim(1, -1)  # (B, *spatial, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x -> (x_hat, quantizer output); out.indices is (B, *spatial)."""
        out = self.quantizer(self._tokens(x))
        return self.decoder(out.z_q.movedim(-1, 1)), out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x -> code indices (B, *spatial), int64."""
        return self.quantizer(self._tokens(x)).indices

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, *spatial) -> x_hat, equal to forward's x_hat for the same codes."""
        return self.decoder(self.quantizer.decode_indices(indices).movedim(-1, 1))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv, for taming's adaptive adversarial weight."""
        return self.decoder.conv_out.weight
