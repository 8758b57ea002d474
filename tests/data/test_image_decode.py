"""Image decoding: data.image_resample gives the reference's images (bilinear) or the fast sharper ones."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from simvq_scale.config import Config, ConfigError
from simvq_scale.data.decode import decode_image

SIZE = 64


def detailed_jpeg(width=300, height=200, seed=0) -> bytes:
    """A photo-like JPEG with detail at every scale: smooth gradients plus blocky noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * 160
    noise = np.kron(rng.uniform(0, 95, (height // 2, width // 2, 3)), np.ones((2, 2, 1)))
    buffer = io.BytesIO()
    Image.fromarray((base + noise).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def decode(data: bytes, resample: str, train: bool = False, seed: int = 0) -> torch.Tensor:
    return decode_image({"__key__": "k", "jpg": data}, SIZE, train, False, np.random.default_rng(seed), resample)


def laplacian_energy(x: torch.Tensor) -> float:
    g = x.mean(0)
    return (4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).abs().mean().item()


def test_bilinear_gives_the_references_torchvision_resize_and_center_crop():
    data = detailed_jpeg()
    expected = T.CenterCrop(SIZE)(T.Resize(SIZE)(Image.open(io.BytesIO(data)).convert("RGB")))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    ours = decode(data, "bilinear")
    assert ours.shape == (3, SIZE, SIZE)
    assert (ours - expected).abs().mean() < 0.01  # same filter and crop; PIL samples the box edge apart


def test_bicubic_draft_is_sharper_than_bilinear():
    data = detailed_jpeg()
    sharp, smooth = decode(data, "bicubic-draft"), decode(data, "bilinear")
    assert laplacian_energy(sharp) > 1.1 * laplacian_energy(smooth)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic-draft"])
def test_training_crops_are_random_and_reproducible_in_both_modes(resample):
    data = detailed_jpeg()
    assert torch.equal(decode(data, resample, True, 3), decode(data, resample, True, 3))
    assert not torch.equal(decode(data, resample, True, 3), decode(data, resample, True, 4))


def test_unknown_resample_is_refused_naming_it():
    cfg = Config()
    cfg.data.image_resample = "lanczos"
    with pytest.raises(ConfigError, match="data.image_resample='lanczos'"):
        cfg.validate()
