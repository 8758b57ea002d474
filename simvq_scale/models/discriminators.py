"""Discriminators for the adversarial loss. Image: taming's PatchGAN (NLayerDiscriminator).

Normalisation (model.discriminator.norm):
  * batch (the default): taming's BatchNorm2d, the reference's D. Real and fake batches are normalised
    apart, each with its own statistics, as the reference calls its D on each. Beside the reference this
    D closed most of the gap in early codebook use that the GroupNorm D had opened (README, "Against the
    reference"). Its statistics are always the batch's (track_running_stats=False): in
    training that is taming's function exactly, and it leaves no running buffers to drift between ranks,
    to checkpoint, or to update in place inside a CUDA graph. D(x) depends on the rest of its micro-batch,
    so on the micro-batch size (world size, gradient accumulation), as the reference's does under DDP.
  * group: GroupNorm(32), per-sample, so D is the same function on every rank for any batch split, and
    real and fake go through in one pass.
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.models.norms import group_norm

DISCRIMINATOR_NORMS = ("batch", "group")


def _init_weights(module: nn.Module) -> None:
    """taming's weights_init: conv N(0, 0.02); norm scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """(B, in_channels, H, W) -> (B, 1, h, w) patch logits: `layers` stride-2 4x4 convs
    (filters channels * min(2^n, 8)), one stride-1 conv, then a 1-channel 4x4 conv; each conv between
    the first and the last is normalised by `norm` (batch | group, the module's docstring)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        if layers < 1 or channels <= 0:
            raise ValueError(f"PatchGAN layers={layers} must be >= 1 and channels={channels} > 0")
        if norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"PatchGAN norm={norm!r} is not one of {'|'.join(DISCRIMINATOR_NORMS)}")
        self.per_sample = norm == "group"
        widths = [channels * min(2 ** n, 8) for n in range(layers + 1)]
        norms = [group_norm(w, f"model.discriminator.channels={channels} (times min(2^n, 8))", eps=1e-5)
                 if self.per_sample else nn.BatchNorm2d(w, track_running_stats=False) for w in widths[1:]]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       norms[n - 1], nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[layers], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, batches: int = 1) -> torch.Tensor:
        """The patch logits of x, which holds `batches` equal batches one after another (real, then fake). A
        BatchNorm D normalises each by its own statistics, as the reference calls its D on each apart; a
        per-sample D is the same function either way and takes them in one pass. One input, so that under CUDA
        graphs the caller's torch.cat copies the fake batch out of the decoder's graph output before D's graph
        runs: a version that passed the decoder's output itself failed on the H200 ("accessing tensor output of
        CUDAGraphs that has been overwritten by a subsequent run"). This one runs under CUDA graphs at the
        GroupNorm D's speed (README, "Against the reference")."""
        if batches == 1 or self.per_sample:
            return self.main(x)
        return torch.cat([self.main(part) for part in x.chunk(batches)])
