"""Image encoder/decoder, the Autoencoder glue around a real SimVQ quantizer, and the PatchGAN."""

import pytest
import torch

from simvq_scale.config import Config, ImageModelConfig
from simvq_scale.models.autoencoder import Autoencoder
from simvq_scale.modality import get_modality
from simvq_scale.models.discriminators import PatchGANDiscriminator
from simvq_scale.models.image import Decoder, Encoder, build_image_autoencoder
from simvq_scale.quant.simvq import SimVQ

TINY = ImageModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1)


def tiny_autoencoder(dim: int = 8, codebook_size: int = 64) -> Autoencoder:
    torch.manual_seed(0)
    return build_image_autoencoder(TINY, SimVQ(codebook_size, dim, seed=1))


def test_reference_geometry_128px_gives_16x16_tokens():
    # channel_mult [1,2,2,4] as the SimVQ config: three halvings. Narrow channels keep it cheap.
    cfg = ImageModelConfig(channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1)
    model = build_image_autoencoder(cfg, SimVQ(128, 16)).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        z = model.encoder(x)
        x_hat, out = model(x)
    assert z.shape == (1, 16, 16, 16)
    assert out.indices.shape == (1, 16, 16) and out.indices.dtype == torch.int64
    assert x_hat.shape == x.shape


def test_tiny_config_shapes_and_z_dim_follows_quantizer():
    model = tiny_autoencoder(dim=12)
    x = torch.randn(2, 3, 32, 32)
    x_hat, out = model(x)
    assert model.encoder(x).shape == (2, 12, 16, 16)
    assert out.z_q.shape == (2, 16, 16, 12)
    assert x_hat.shape == x.shape
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_decode_indices_equals_forward_exactly_in_fp32_eval():
    model = tiny_autoencoder().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x_hat, out = model(x)
        indices = model.encode(x)
        decoded = model.decode_indices(indices)
    assert torch.equal(indices, out.indices)
    assert indices.unique().numel() > 1  # a real test only if several codes are in play
    assert torch.equal(decoded, x_hat)


def test_gradient_reaches_encoder_through_straight_through_quantizer():
    model = tiny_autoencoder()
    x = torch.randn(2, 3, 32, 32)
    x_hat, out = model(x)
    (x_hat - x).abs().mean().backward()  # reconstruction only: no commitment term in this loss
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantizer.proj.weight.grad is None  # sg(q) in the straight-through path
    model.zero_grad(set_to_none=True)
    model(x)[1].loss.backward()  # the commitment loss is what trains W
    assert model.quantizer.proj.weight.grad.abs().sum() > 0


def test_last_layer_is_the_decoders_final_conv_weight():
    model = tiny_autoencoder()
    assert model.last_layer is model.decoder.conv_out.weight
    assert model.last_layer.shape[0] == 3


def test_encoder_decoder_constructor_sizes():
    enc = Encoder(channels=32, channel_mult=[1, 1, 2], num_res_blocks=1, in_channels=1, z_channels=5)
    dec = Decoder(channels=32, channel_mult=[1, 1, 2], num_res_blocks=1, out_channels=1, z_channels=5)
    z = enc(torch.randn(1, 1, 16, 20))
    assert z.shape == (1, 5, 4, 5)
    assert dec(z).shape == (1, 1, 16, 20)


def test_bad_sizes_name_the_value():
    with pytest.raises(ValueError, match="48 channels"):
        Encoder(channels=48, channel_mult=[1], num_res_blocks=1)
    with pytest.raises(ValueError, match="channel_mult"):
        Decoder(channels=32, channel_mult=[], num_res_blocks=1)
    enc = Encoder(channels=32, channel_mult=[1, 2], num_res_blocks=1)
    with pytest.raises(ValueError, match=r"\(31, 32\).*factor 2"):
        enc(torch.randn(1, 3, 31, 32))
    model = Autoencoder(enc, SimVQ(16, 7), Decoder(channels=32, channel_mult=[1, 2], num_res_blocks=1))
    with pytest.raises(ValueError, match="128 channels but the quantizer's dim is 7"):
        model(torch.randn(1, 3, 8, 8))


def test_patchgan_shape_and_config():
    cfg = Config()
    cfg.model.discriminator.channels, cfg.model.discriminator.layers = 32, 2
    disc = get_modality("image").build_discriminator(cfg)
    logits = disc(torch.randn(2, 3, 32, 32))
    # 2 stride-2 convs (32 -> 16 -> 8), then two 4x4 stride-1 convs with padding 1 (8 -> 7 -> 6)
    assert logits.shape == (2, 1, 6, 6)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [32, 64, 128, 1]


def test_group_norm_patchgan_is_per_sample_and_takes_real_and_fake_in_one_call():
    # norm=group: D(x) does not depend on the rest of the micro-batch, so one call on real and fake is two calls
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(channels=32, layers=2, norm="group").train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = disc(x)
        apart = torch.cat([disc(x[:1]), disc(x[1:])])
        real, fake = disc(torch.cat([x, x]), batches=2).chunk(2)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real, together, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fake, together, rtol=1e-5, atol=1e-5)


def test_batch_norm_patchgan_normalises_real_and_fake_apart_with_batch_statistics():
    # norm=batch (the reference's D): each batch by its own statistics, in training and in eval alike
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(channels=32, layers=2)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 2
    assert not list(disc.buffers())  # no running statistics to drift between ranks or checkpoint
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 3 + 1
    with torch.no_grad():
        joint = disc(torch.cat([x, y]))
        real, fake = disc(torch.cat([x, y]), batches=2).chunk(2)
        torch.testing.assert_close(real, disc(x))
        torch.testing.assert_close(fake, disc.eval()(y))
    assert not torch.allclose(torch.cat([real, fake]), joint, atol=1e-3)  # one call would mix their statistics
    # taming's weights_init: the norms' scales N(1, 0.02), shifts 0
    scales = torch.cat([m.weight for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(scales.mean().item() - 1.0) < 0.01 and 0.005 < scales.std().item() < 0.04


def test_unknown_modality_is_named_and_bad_widths_refused():
    with pytest.raises(ValueError, match="data.modality='video'"):
        get_modality("video")
    with pytest.raises(ValueError, match="channels=40"):
        PatchGANDiscriminator(channels=40, norm="group")
    with pytest.raises(ValueError, match=r"norm='layer' is not one of batch\|group"):
        PatchGANDiscriminator(norm="layer")


@pytest.mark.slow
def test_compiled_batch_norm_patchgan_takes_real_and_fake_in_one_call():
    # the trainer compiles D: one compiled call on the concatenation (the D step's only call) is the eager function
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(channels=32, layers=2)
    compiled = torch.compile(disc)
    both = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(both, batches=2), torch.cat([disc(both[:4]), disc(both[4:])]),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(both[:4]), disc(both[:4]), rtol=1e-4, atol=1e-4)
