"""Image reconstruction metrics, per image, on images in [-1, 1] (the model's range).

PSNR and SSIM are computed on [0, 1] (data range 1) per image; the reported figure is the mean of the
per-image values. (The SimVQ reference code computes PSNR of the MSE pooled over a batch, which depends
on the batch composition and is a different number.) LPIPS and rFID use ImageNet networks loaded only
from local files through simvq_scale.pretrained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from simvq_scale.pretrained import load_fid_inception, load_lpips

MIN_MSE = 1e-10  # PSNR of identical images is capped at 100 dB instead of inf, so means stay finite
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (decoders overshoot)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of each image pair, on [0, 1] with data range 1."""
    mse = (to_unit(x) - to_unit(x_hat)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of each image pair: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1."""
    return structural_similarity_index_measure(to_unit(x_hat), to_unit(x), data_range=1.0, reduction="none")


class Lpips(nn.Module):
    """LPIPS v0.1 with the ImageNet trunk `net` ("vgg" | "alex") from a local file; (B,) distances."""

    def __init__(self, net: str, path: str = ""):
        super().__init__()
        self.model = load_lpips(net, path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), x_hat.float().clamp(-1, 1)).flatten()


class InceptionPoolFeatures(nn.Module):
    """The FID InceptionV3 (TorchScript) as a torchmetrics feature extractor taking images in [-1, 1].

    Images are resized bilinearly to 299 x 299 and scaled to the TF Inception input range
    (pixel value p in 0..255 -> (p - 128) / 128), giving the 2048-d pool features.
    """

    num_features = INCEPTION_FEATURES  # read by torchmetrics instead of probing with a dummy image

    def __init__(self, path: str = ""):
        super().__init__()
        self.net = load_fid_inception(path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net((x * 255 - 128) / 128)


def reconstruction_fid(path: str = "") -> FrechetInceptionDistance:
    """rFID: Frechet distance between Inception pool features of the originals (real) and reconstructions.

    Its states are sums, reduced over all ranks by torchmetrics when compute() runs (on every rank)."""
    return FrechetInceptionDistance(feature=InceptionPoolFeatures(path), reset_real_features=True)
