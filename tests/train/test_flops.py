"""The trainer's model FLOP count (MFU's numerator): every product of a training sample, by hand on tiny nets."""

import pytest
import torch
from torch import nn

from simvq_scale.quant.fsq import FSQ
from simvq_scale.quant.simvq import SimVQ
from simvq_scale.train.flops import count_per_sample


def conv_flops(c_in, c_out, kernel, out_side):
    return 2 * c_in * c_out * kernel * kernel * out_side * out_side


class TinyGenerator(nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 2, stride=2)  # 8 x 8 -> 4 x 4 tokens of dim 4
        self.decoder = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.quantizer = quantizer


class PairLoss(nn.Module):
    """A loss network called as net(x, x_hat), like LPIPS: one conv on each image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x, x_hat):
        return (self.conv(x) - self.conv(x_hat)).abs().mean()


def test_the_count_adds_g_d_the_loss_networks_and_the_search():
    quantizer = SimVQ(codebook_size=32, dim=4)
    generator, disc = TinyGenerator(quantizer), nn.Conv2d(3, 1, 4, stride=2, padding=1)  # 8 x 8 -> 4 x 4
    g = 2 * conv_flops(3, 4, 2, 4)  # the transposed conv costs what its adjoint, the encoder's conv, does
    d = conv_flops(3, 1, 4, 4)
    tokens, plain = count_per_sample(generator, disc, (3, 8, 8))
    assert tokens == 16
    search = 16 * 2 * 32 * 4
    assert plain == pytest.approx(3 * g + 9 * d + search)
    _, with_loss = count_per_sample(generator, disc, (3, 8, 8), [PairLoss()])
    # forward on x and x_hat, backward to x_hat only: 1.5 calls of two convs
    assert with_loss - plain == pytest.approx(1.5 * 2 * conv_flops(3, 5, 3, 8))
    assert next(generator.parameters()).device.type == "cpu"  # counted on copies: the model stays where it is


def test_quantizers_that_do_not_search_add_nothing():
    fsq = FSQ(levels=[4, 4], dim=4)
    assert fsq.search_flops_per_token() == 0.0
    assert SimVQ(codebook_size=64, dim=8).search_flops_per_token() == 2 * 64 * 8
