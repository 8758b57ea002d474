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
        self.lpips = load_lpips("vgg", path)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, x_hat).mean()  # in the batch's own layout (channels_last stays so)
