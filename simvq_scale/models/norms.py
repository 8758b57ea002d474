"""The one GroupNorm the image nets, the audio pre-net and the PatchGAN share (the reference's Normalize)."""

from __future__ import annotations

from torch import nn

NORM_GROUPS = 32


def group_norm(channels: int, setting: str, eps: float = 1e-6, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm(32, channels); `setting` names the config keys that chose `channels`, for the error."""
    if channels % NORM_GROUPS:
        raise ValueError(f"{channels} channels do not divide into GroupNorm's {NORM_GROUPS} groups; "
                         f"choose {setting} as multiples of {NORM_GROUPS}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=eps, affine=affine)
