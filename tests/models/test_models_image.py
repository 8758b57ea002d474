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


def test_patchgan_is_per_sample_so_batch_split_does_not_matter():
    # why GroupNorm and not taming's BatchNorm: D(x) must not depend on the rest of the micro-batch
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(channels=32, layers=2).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = disc(x)
        apart = torch.cat([disc(x[:1]), disc(x[1:])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_unknown_modality_is_named_and_bad_widths_refused():
    with pytest.raises(ValueError, match="data.modality='video'"):
        get_modality("video")
    with pytest.raises(ValueError, match="channels=40"):
        PatchGANDiscriminator(channels=40)
