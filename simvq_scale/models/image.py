"""The convolutional image encoder/decoder of the SimVQ code (VQGAN-style, no attention).

Structure as the reference's improved_model.py: per level `num_res_blocks` pre-norm residual
blocks (GroupNorm(32) + swish + bias-free 3x3 convs), a stride-2 3x3 conv between levels on the
way down and a 3x3 conv + depth-to-space (x2) on the way up, `num_res_blocks` middle blocks at
the lowest resolution, GroupNorm + swish + conv to z at the ends. With channel_mult [1,2,2,4]
a 128 px image becomes 16x16 tokens (len(channel_mult) - 1 halvings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simvq_scale.config import ImageModelConfig
from simvq_scale.models import norms
from simvq_scale.models.autoencoder import Autoencoder

WIDTHS = "model.image.channels * channel_mult"


def group_norm(channels: int) -> nn.GroupNorm:
    return norms.group_norm(channels, WIDTHS)


class ResBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class DepthToSpaceUpsample(nn.Module):
    """3x3 conv to 4x the channels, then pixel shuffle: (C, H, W) -> (C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference's DCR depth_to_space reads channel (i*2 + j)*C + c as offset (i, j) of
        # output channel c; pixel_shuffle reads c*4 + i*2 + j. Both are a fixed permutation of
        # a freshly initialised conv's outputs, so they train the same; pixel_shuffle is fused.
        return F.pixel_shuffle(self.conv(x), 2)


def _check_sizes(channels: int, channel_mult: list[int], num_res_blocks: int, z_channels: int) -> None:
    if channels <= 0 or z_channels <= 0 or num_res_blocks <= 0:
        raise ValueError(f"channels={channels}, z_channels={z_channels}, num_res_blocks={num_res_blocks} "
                         "must all be > 0")
    if not channel_mult or any(m <= 0 for m in channel_mult):
        raise ValueError(f"channel_mult={channel_mult} must be a non-empty list of positive integers")


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / 2^(L-1), W / 2^(L-1)), L = len(channel_mult)."""

    def __init__(self, channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 128):
        super().__init__()
        _check_sizes(channels, list(channel_mult), num_res_blocks, z_channels)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(width, channels * mult))
                width = channels * mult
            if level < len(channel_mult) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [ResBlock(width, width) for _ in range(num_res_blocks)]  # middle blocks
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the encoder's "
                             f"downsampling factor {self.downsample_factor}")
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)); mirror of Encoder."""

    def __init__(self, channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 128):
        super().__init__()
        _check_sizes(channels, list(channel_mult), num_res_blocks, z_channels)
        width = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(width, width) for _ in range(num_res_blocks)]  # middle blocks
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(width, channels * channel_mult[level]))
                width = channels * channel_mult[level]
            if level > 0:
                layers.append(DepthToSpaceUpsample(width))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


def build_image_autoencoder(model_cfg: ImageModelConfig, quantizer: nn.Module, channels: int = 3) -> Autoencoder:
    """Encoder -> quantizer -> Decoder with z dim = quantizer.dim, for images of `channels` channels."""
    sizes = dict(channels=model_cfg.channels, channel_mult=list(model_cfg.channel_mult),
                 num_res_blocks=model_cfg.num_res_blocks, z_channels=quantizer.dim)
    return Autoencoder(Encoder(in_channels=channels, **sizes), quantizer, Decoder(out_channels=channels, **sizes))
