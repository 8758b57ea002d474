"""The speech codec's networks and loss terms: lengths, shapes, hand values."""

import math

import pytest
import torch

from simvq_scale.config import load_config
from simvq_scale.losses.audio import LogMelSpectrogram, feature_matching_loss, hinge_generator_loss, mel_loss
from simvq_scale.losses.gan_audio import AudioGANObjective
from simvq_scale.modality import get_modality
from simvq_scale.models.audio import ISTFTHead, SEANetEncoder, build_audio_autoencoder
from simvq_scale.models.audio_discriminators import build_audio_discriminator
from simvq_scale.quant import build_quantizer
from tests.helpers import ROOT
RATE = 24000


def tiny_cfg(*overrides):
    return load_config(ROOT / "configs" / "audio_demo.yaml", ["quantizer.codebook_size=64", *overrides])


def tiny_codec(*overrides):
    cfg = tiny_cfg(*overrides)
    torch.manual_seed(0)
    return get_modality("audio").build_generator(cfg, build_quantizer(cfg.quantizer)), cfg


def speech_like(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Harmonic tone with a moving pitch and a little noise, amplitude ~0.3."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / RATE
    f0 = 120 + 40 * torch.rand(batch, 1, generator=g)
    wave = sum(torch.sin(2 * math.pi * k * f0 * t * (1 + 0.05 * t)) / k for k in range(1, 6))
    return 0.2 * wave + 0.01 * torch.randn(batch, length, generator=g)


@pytest.mark.parametrize("length", [24001, 12345, 320, 1])
def test_output_length_equals_input_length_for_any_length(length):
    codec, _ = tiny_codec()
    x = speech_like(2, length)
    x_hat, out = codec(x)
    assert x_hat.shape == x.shape
    assert out.indices.shape == (2, math.ceil(length / 320))  # the encoder pads to a multiple of the hop
    assert torch.isfinite(x_hat).all()


def test_reference_geometry_is_75_tokens_per_second_of_512_dims():
    encoder = SEANetEncoder(dim=512, filters=32, strides=[8, 5, 4, 2], lstm_layers=2).to("meta")
    assert encoder(torch.empty(1, RATE, device="meta")).shape == (1, 512, 75)


def test_compiled_encoder_is_two_graphs_around_the_eager_lstm():
    """The LSTM cannot be compiled; the layers before and after it must still compile as one graph each (a
    graph break inside nn.Sequential's loop had made every layer call a graph of its own)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    encoder = SEANetEncoder(dim=16, filters=4, strides=[2, 2], lstm_layers=1)
    x = speech_like(2, 400)
    expected = encoder(x)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    encoder.compile(backend="eager")
    got = encoder(x)
    got.sum().backward()
    assert counters["stats"]["unique_graphs"] - before == 2
    assert torch.equal(got, expected)
    assert encoder.model[encoder.lstm_index].lstm.weight_ih_l0.grad is not None  # the eager LSTM trains too
    torch._dynamo.reset()


def test_causal_encoder_token_ignores_the_future():
    codec, _ = tiny_codec("model.audio.causal=true")
    x = speech_like(1, 6400)
    y = x.clone()
    y[:, 3200:] = torch.randn(1, 3200)  # change only samples from token 10 on
    with torch.no_grad():
        zx, zy = codec.encoder(x), codec.encoder(y)
    assert torch.equal(zx[..., :10], zy[..., :10])
    assert not torch.equal(zx[..., 10:], zy[..., 10:])


def test_decode_indices_equals_forward_in_eval():
    codec, _ = tiny_codec()
    codec.eval()
    x = speech_like(2, 9600)
    with torch.no_grad():
        x_hat, out = codec(x)
        again = codec.decode_indices(out.indices)
    assert again.shape == (2, 9600)  # 30 tokens of 320 samples: already a multiple of the hop
    assert torch.equal(again, x_hat)


def test_istft_head_overlap_add_inverts_same_padded_frames():
    # "same" padding: frame i covers samples [i*hop - (n_fft-hop)/2, i*hop + (n_fft+hop)/2); analysis
    # window, rfft, irfft, synthesis window, overlap-add / summed squared window must give the signal back
    n_fft, hop, n_frames = 64, 16, 20
    head = ISTFTHead(dim=4, n_fft=n_fft, hop=hop)
    wave = speech_like(1, hop * n_frames)
    trim = (n_fft - hop) // 2
    frames = torch.nn.functional.pad(wave, (trim, trim)).unfold(-1, n_fft, hop)  # (1, n_frames, n_fft)
    spectrum = torch.fft.rfft(frames * head.window, dim=-1).transpose(1, 2)
    recon = head._overlap_add(torch.fft.irfft(spectrum, n_fft, dim=1) * head.window[:, None])
    assert recon.shape == wave.shape
    torch.testing.assert_close(recon, wave, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_fft, hop", [(64, 16), (10, 4), (8, 8)])
def test_overlap_add_is_the_sum_fold_computes(n_fft, hop):
    # frame l starts at sample l * hop; hop need not divide n_fft
    frames = torch.randn(3, n_fft, 7, dtype=torch.float64, requires_grad=True)
    head = ISTFTHead(dim=4, n_fft=n_fft, hop=hop)
    length = 6 * hop + n_fft
    folded = torch.nn.functional.fold(frames, output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))
    summed = head._add_shifted(frames)
    torch.testing.assert_close(summed, folded[:, 0, 0])
    weights = torch.randn(3, length, dtype=torch.float64)
    grad_summed, = torch.autograd.grad((summed * weights).sum(), frames)
    grad_folded, = torch.autograd.grad((folded[:, 0, 0] * weights).sum(), frames)
    torch.testing.assert_close(grad_summed, grad_folded)


def test_hop_must_match_the_strides():
    cfg = tiny_cfg("model.audio.hop=256")
    with pytest.raises(ValueError, match="model.audio.hop=256"):
        build_audio_autoencoder(cfg.model.audio, build_quantizer(cfg.quantizer))


def test_gradient_reaches_encoder_decoder_and_w():
    codec, _ = tiny_codec()
    x = speech_like(2, 4800)
    x_hat, out = codec(x)
    ((x_hat - x).abs().mean() + out.loss).backward()
    assert codec.encoder.model[0].conv.parametrizations.weight.original1.grad.abs().sum() > 0
    assert codec.decoder.head.out.weight.grad.abs().sum() > 0
    assert codec.quantizer.proj.weight.grad.abs().sum() > 0
    assert codec.last_layer is codec.decoder.head.out.weight


def test_compiled_discriminator_is_one_graph_per_gradient_mode():
    """Every period and resolution in one graph around the eager STFTs (a break inside the loop over
    sub-discriminators had compiled each of them, and each period, as graphs of their own)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    disc = build_audio_discriminator(tiny_cfg().model.audio)
    wave = speech_like(2, 2400)
    with torch.no_grad():
        expected = disc(wave)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    disc.compile(backend="eager")
    with torch.no_grad():
        got = disc(wave)
    fake = wave.clone().requires_grad_(True)  # the generator step: gradients to the input
    sum(logits.sum() for logits in disc(fake)["mpd"][0] + disc(fake)["mrd"][0]).backward()
    assert counters["stats"]["unique_graphs"] - before <= 2
    for name in ("mpd", "mrd"):
        for a, b in zip(got[name][0], expected[name][0]):
            assert torch.equal(a, b)
    assert fake.grad.abs().sum() > 0
    torch._dynamo.reset()


def test_feature_matching_inside_d_is_the_loss_of_its_maps_with_the_same_gradient():
    """The generator step's D computes feature matching itself (its maps never leave the compiled graph): the
    same loss, and the same gradient to the fake half, as matching the maps it returns."""
    disc = build_audio_discriminator(tiny_cfg().model.audio)
    real = speech_like(2, 2400)
    fakes = [speech_like(2, 2400, seed=1).requires_grad_(True) for _ in range(2)]
    inside = disc(torch.cat([real, fakes[0]]), match_halves=True)
    outside = disc(torch.cat([real, fakes[1]]))
    losses = []
    for group in ("mpd", "mrd"):
        maps = outside[group][1]
        expected = feature_matching_loss([[f.chunk(2)[0] for f in m] for m in maps],
                                         [[f.chunk(2)[1] for f in m] for m in maps])
        assert inside[group][1].item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0
        for a, b in zip(inside[group][0], outside[group][0]):
            assert torch.equal(a, b)
        losses.append((inside[group][1], expected))
    sum(loss for loss, _ in losses).backward()
    sum(loss for _, loss in losses).backward()
    torch.testing.assert_close(fakes[0].grad, fakes[1].grad)
    assert fakes[0].grad.abs().sum() > 0


def test_mpd_mrd_shapes_and_feature_maps():
    cfg = load_config(ROOT / "configs" / "audio_262k.yaml")
    disc = build_audio_discriminator(cfg.model.audio)
    length = 6007
    with torch.no_grad():
        groups = disc(speech_like(2, length))
    logits, features = groups["mpd"]
    assert len(logits) == 5 and len(features) == 5
    for (logit, maps), period in zip(zip(logits, features), [2, 3, 5, 7, 11]):
        assert logit.shape[0] == 2 and len(maps) == 5  # 4 convs after the first + the output conv
        assert maps[-1].shape[-1] == period and maps[0].shape[1] == 128
    logits, features = groups["mrd"]
    assert len(logits) == 3 and all(len(maps) == 6 for maps in features)
    frames = [length // hop + 1 for hop in (256, 512, 128)]  # centred STFT frames
    for maps, n_frames in zip(features, frames):
        assert maps[0].shape[1] == 64 and maps[0].shape[-1] == math.ceil(n_frames / 2)
    full = get_modality("audio").build_discriminator(cfg)
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in disc.parameters())


def test_mel_loss_is_zero_for_the_same_signal_and_grows_with_noise():
    log_mel = LogMelSpectrogram(RATE, 1024, 256, 100)
    x = speech_like(2, RATE // 2)
    assert mel_loss(log_mel, x, x).item() == 0.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    losses = [mel_loss(log_mel, x, x + level * noise).item() for level in (1e-3, 1e-2, 1e-1)]
    assert 0 < losses[0] < losses[1] < losses[2]
    assert log_mel(x).shape == (2, 100, RATE // 2 // 256 + 1)


def test_feature_matching_hand_value_and_real_side_detached():
    real = [[torch.zeros(2, 3), torch.ones(4)], [torch.full((5,), 2.0)]]
    fake = [[torch.ones(2, 3), torch.full((4,), 3.0)], [torch.full((5,), -1.0, requires_grad=True)]]
    # disc 1: |0-1| + |1-3| = 3; disc 2: |2-(-1)| = 3; mean over discriminators = 3
    assert feature_matching_loss(real, fake).item() == pytest.approx(3.0)
    real_leaf = torch.zeros(3, requires_grad=True)
    feature_matching_loss([[real_leaf]], [[torch.ones(3, requires_grad=True)]]).backward()
    assert real_leaf.grad is None


def test_hinge_generator_loss_hand_value():
    logits = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0])]
    # mean(relu(1 - l)): disc 1 (0.5 + 0) / 2 = 0.25, disc 2: 2; mean = 1.125
    assert hinge_generator_loss(logits).item() == pytest.approx(1.125)


def test_objective_parts_and_weights():
    codec, cfg = tiny_codec("loss.mel_weight=2.0", "loss.commit_weight=10.0", "loss.adv_weight=0.5",
                            "loss.feature_matching_weight=3.0")
    disc = get_modality("audio").build_discriminator(cfg)
    objective = AudioGANObjective(cfg.loss, cfg.data.sample_rate)
    x = speech_like(2, 4800)
    x_hat, out = codec(x)
    total, parts = objective.generator_loss(x, x_hat, out, disc, codec.last_layer)
    expected = (2.0 * parts["loss/mel"] + 10.0 * parts["loss/commit"]
                + 0.5 * (parts["loss/g_adv"] + 3.0 * parts["loss/feature_matching"]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in parts.values())
    assert parts["loss/feature_matching"] > 0 and parts["loss/g_adv"] > 0
    no_adv_total, no_adv = objective.generator_loss(x, x_hat, out, None, None)
    assert no_adv["loss/g_adv"] == 0 and no_adv["loss/feature_matching"] == 0
    loss_d, d_parts = objective.discriminator_loss(disc, x, x_hat)
    assert set(d_parts) == {"loss/d", "disc/logits_real", "disc/logits_fake"} and loss_d.item() > 0
    # D runs once on real and fake together: the same loss as two separate calls (per-sample D)
    from simvq_scale.losses.adversarial import hinge_d_loss

    real, fake = disc(x), disc(x_hat.detach())
    separate = sum(torch.stack([hinge_d_loss(r, f) for r, f in zip(real[g][0], fake[g][0])]).mean() for g in real)
    assert loss_d.item() == pytest.approx(separate.item(), rel=1e-5)
    loss_d.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in codec.parameters())  # x_hat is detached for D
