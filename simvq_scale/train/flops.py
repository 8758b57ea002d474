"""Model FLOPs of one training sample, counted on the meta device (no compute, no collectives)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak by the vendors' datasheets (FLOP/s), for MFU; by substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


@torch.no_grad()
def count_per_sample(generator: nn.Module, discriminator: nn.Module, sample_shape: tuple[int, ...]
                     ) -> tuple[int, float]:
    """(tokens per sample, model FLOPs per training sample).

    A training sample costs forward + backward (3x forward) of the encoder and decoder, and of D once in
    the G step (its backward reaches the input only, counted as a full one) and twice in the D step
    (real, fake): 3 G + 9 D forwards. The search and LPIPS are not counted.
    """
    encoder, decoder, disc = (copy.deepcopy(m).to("meta") for m in
                              (generator.encoder, generator.decoder, discriminator))
    x = torch.empty(1, *sample_shape, device="meta")
    with FlopCounterMode(display=False) as generator_flops:
        z = encoder(x)
        x_hat = decoder(z)
    with FlopCounterMode(display=False) as disc_flops:
        disc(x_hat)
    return math.prod(z.shape[2:]), 3.0 * generator_flops.get_total_flops() + 9.0 * disc_flops.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs, unlisted cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
