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
def count_per_sample(generator: nn.Module, discriminator: nn.Module, sample_shape: tuple[int, ...],
                     loss_networks: list[nn.Module] = ()) -> tuple[int, float]:
    """(tokens per sample, model FLOPs per training sample): every product the step computes for a sample.

    Forward + backward (3x forward) of the encoder and decoder; D once in the G step (its backward reaches
    the input only, counted as a full one) and twice in the D step (real, fake): 3 G + 9 D forwards. Each of
    the objective's `loss_networks` (LPIPS), called as net(x, x_hat), runs forward on both and backward to
    x_hat alone: 1.5 such calls. The quantizer compares each token with every code (its
    search_flops_per_token). Not counted: the search's fp32 re-checks, which depend on the data, and the
    codebook's projection C W (once per step, not per sample).
    """
    encoder, decoder, disc, *losses = (copy.deepcopy(m).to("meta") for m in
                                       (generator.encoder, generator.decoder, discriminator, *loss_networks))
    x = torch.empty(1, *sample_shape, device="meta")
    with FlopCounterMode(display=False) as generator_flops:
        z = encoder(x)
        x_hat = decoder(z)
    with FlopCounterMode(display=False) as disc_flops:
        disc(x_hat)
    with FlopCounterMode(display=False) as loss_flops:
        for net in losses:
            net(x, x_hat)
    tokens = math.prod(z.shape[2:])
    return tokens, (3.0 * generator_flops.get_total_flops() + 9.0 * disc_flops.get_total_flops()
                    + 1.5 * loss_flops.get_total_flops() + tokens * generator.quantizer.search_flops_per_token())


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs, unlisted cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
