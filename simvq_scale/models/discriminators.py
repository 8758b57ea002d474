"""Discriminators for the adversarial loss. Image: taming's PatchGAN (NLayerDiscriminator).

Normalisation: taming uses BatchNorm2d. We use GroupNorm(32) in its place, because
  * D is called on real and fake batches separately, so BatchNorm normalises each with its own
    batch statistics (a shortcut D can exploit) and its output depends on the micro-batch size,
    i.e. on world size and gradient accumulation, while the loss should not;
  * BatchNorm's running statistics are buffers that neither DeepSpeed ZeRO nor DDP keep in sync
    across ranks (each rank drifts; only rank 0's are checkpointed), and SyncBatchNorm would add
    a collective to every D forward;
GroupNorm is per-sample, so D is the same function on every rank for any batch split.
"""

from __future__ import annotations

from torch import nn

from simvq_scale.models.norms import group_norm


def _init_weights(module: nn.Module) -> None:
    """taming's weights_init: conv N(0, 0.02); norm scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """(B, in_channels, H, W) -> (B, 1, h, w) patch logits: `layers` stride-2 4x4 convs
    (filters channels * min(2^n, 8)), one stride-1 conv, then a 1-channel 4x4 conv."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1 or channels <= 0:
            raise ValueError(f"PatchGAN layers={layers} must be >= 1 and channels={channels} > 0")
        widths = [channels * min(2 ** n, 8) for n in range(layers + 1)]
        norms = [group_norm(w, f"model.discriminator.channels={channels} (times min(2^n, 8))", eps=1e-5)
                 for w in widths[1:]]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       norms[n - 1], nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[layers], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x):
        return self.main(x)

