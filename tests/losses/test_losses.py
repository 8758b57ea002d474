"""GAN loss terms against hand computations; LPIPS loss on a deliberately RANDOM-trunk network."""

import math

import pytest
import torch

from simvq_scale.losses.adversarial import adaptive_weight, generator_adv_loss, hinge_d_loss
from simvq_scale.losses.perceptual import PerceptualLoss


def test_hinge_d_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - l) = 0, 0.5, 2    -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + l) = 0, 1, 2.5    -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    # confident and right on both sides: no loss, no gradient
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.5)).item() == 0.0


def test_generator_loss_is_softplus_of_minus_per_sample_mean_logit():
    logits = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]]], [[[-2.0, -2.0], [0.0, -4.0]]]])  # means 1, -2
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0)))
    assert generator_adv_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    fooled = generator_adv_loss(torch.full((2, 1, 2, 2), 20.0)).item()
    assert fooled < 1e-8  # D says "real" with confidence: the generator has nothing to gain


def test_adaptive_weight_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    nll, g = (a * w).sum() + 7.0, (b * w ** 2).sum()  # d nll/dw = a; d g/dw = 2 b w
    expected = a.norm() / ((2 * b * w).detach().norm() + 1e-4)  # 5 / (|2w| + 1e-4)
    weight = adaptive_weight(nll, g, w)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad
    # a generator gradient of zero would divide by 1e-4: clamped to max_weight
    assert adaptive_weight(nll, (0.0 * w).sum(), w, max_weight=100.0).item() == 100.0


def test_adaptive_weight_on_the_decoder_last_layer_of_a_model():
    from simvq_scale.config import ImageModelConfig
    from simvq_scale.models.discriminators import PatchGANDiscriminator
    from simvq_scale.models.image import build_image_autoencoder
    from simvq_scale.quant.simvq import SimVQ

    torch.manual_seed(0)
    model = build_image_autoencoder(ImageModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1),
                                    SimVQ(32, 8))
    disc = PatchGANDiscriminator(channels=32, layers=2)
    x = torch.randn(2, 3, 32, 32)
    x_hat, _ = model(x)
    nll, g = (x - x_hat).abs().mean(), generator_adv_loss(disc(x_hat))
    weight = adaptive_weight(nll, g, model.last_layer)
    nll_grad = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, model.last_layer, retain_graph=True)[0]
    assert weight.item() == pytest.approx((nll_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-6)
    assert weight.item() > 0


@pytest.fixture(scope="module")
def random_lpips(tmp_path_factory) -> PerceptualLoss:
    """The production PerceptualLoss reading a trunk file in the fetch tool's format (torchvision's
    vgg16().features state dict) that holds a RANDOM VGG16, on purpose: no real weights file needed."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "random_vgg16_features.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().features.state_dict(), path)
    return PerceptualLoss(str(path))


def test_perceptual_loss_zero_on_identical_images_random_weights(random_lpips):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert random_lpips(x, x).item() == 0.0
    assert random_lpips(x, x.flip(-1)).item() > 0.0


def test_perceptual_loss_is_frozen_scalar_and_differentiable_in_x_hat(random_lpips):
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.lpips.training  # dropout of the heads stays off
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    loss = random_lpips(x, x_hat)
    assert loss.ndim == 0
    loss.backward()
    assert x_hat.grad.abs().sum() > 0


def test_perceptual_loss_runs_its_convolutions_channels_last_with_unchanged_value(random_lpips):
    """cuDNN's bf16 convolutions are NHWC: an eager NCHW trunk pays a layout transpose around each."""
    import copy

    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)
        and m.weight.is_contiguous(memory_format=torch.channels_last)))
        for m in random_lpips.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    try:
        value = random_lpips(x, x_hat)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) >= 2 * 13 and all(seen)  # both images through the 13 VGG convolutions, then the heads
    nchw = copy.deepcopy(random_lpips.lpips).to(memory_format=torch.contiguous_format)
    assert value.item() == pytest.approx(nchw(x, x_hat).mean().item(), rel=1e-5)
