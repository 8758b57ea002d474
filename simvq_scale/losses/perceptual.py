"""LPIPS (VGG16, v0.1) perceptual loss on images in [-1, 1]; weights from simvq_scale.pretrained."""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.pretrained import load_lpips


class PerceptualLoss(nn.Module):
    """forward(x, x_hat) -> scalar mean LPIPS over the batch, with the LPIPS-VGG trunk file at `path`
    (loss.perceptual_weights). The network is frozen and stays in eval mode (train() does not switch its
    dropout on); gradients flow to x_hat only."""

    def __init__(self, path: str = ""):
        super().__init__()
        # channels_last weights and inputs: cuDNN's bf16 convolutions are NHWC, and an eager NCHW trunk pays a
        # layout transpose around each (a compiled trunk picks channels_last itself: no VGG conv narrows)
        self.lpips = load_lpips("vgg", path).to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last
        return self.lpips(x.contiguous(memory_format=layout), x_hat.contiguous(memory_format=layout)).mean()
