"""The WavTokenizer-style speech codec of the SimVQ code: SEANet encoder, Vocos decoder, iSTFT head.

Encoder (EnCodec's SEANet): weight-normalised 1-D convs with ELU, per stride a residual block and a
strided conv (kernel 2 x stride) doubling the width, a 2-layer LSTM with a skip, a conv to the token
width. Strides [8, 5, 4, 2] give one token per 320 samples: 75 tokens/s at 24 kHz.
Decoder (Vocos backbone): conv embed, the reference's pre-net (2 residual blocks, self-attention,
2 residual blocks, GroupNorm), LayerNorm, ConvNeXt blocks with layer scale, LayerNorm; then a linear
layer to log-magnitude and phase of an STFT (n_fft 1280, hop 320) and an inverse STFT with "same"
padding, which gives exactly hop samples per token.

Lengths: the encoder pads its input on the right (zeros) up to a multiple of the hop, so every
strided conv sees a length divisible by its stride and emits ceil(T / hop) tokens; the decoder emits
tokens * hop samples, and AudioAutoencoder.forward crops them back to the input's length T.
decode_indices returns the padded length (tokens * hop).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from simvq_scale.config import AudioModelConfig
from simvq_scale.models.autoencoder import Autoencoder
from simvq_scale.models.norms import group_norm
from simvq_scale.quant.base import QuantizerOutput

PRENET_WIDTH = "model.audio.decoder_dim (or set model.audio.prenet=false)"


def autocast_off(device: torch.device):
    """Full precision inside (FFTs have no bf16 kernels); also usable on the meta device (shape/FLOP counts).

    A plain comparison of the device type, not torch's is_autocast_available: torch.compile traces this
    without a graph break (a break splits the discriminators into graphs that recompile per shape)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Reflect padding that also works when the signal is shorter than the padding (zeros extend it first)."""
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode="reflect")
    return x[..., :x.shape[-1] - extra] if extra else x


class PaddedConv1d(nn.Module):
    """Weight-normalised Conv1d that keeps length / stride frames: causal (all padding on the left) or
    centred (the odd sample on the left), reflect padding. Inputs must be a multiple of the stride long."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, causal: bool = True):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation))
        total = (kernel_size - 1) * dilation - (stride - 1)
        self.padding = (total, 0) if causal else (total - total // 2, total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(reflect_pad(x, *self.padding))


class SEANetResidualBlock(nn.Module):
    """x -> shortcut(x) + conv1(ELU(conv3(ELU(x)))), the branch at half the width, 1x1 conv shortcut."""

    def __init__(self, channels: int, dilation: int, causal: bool):
        super().__init__()
        hidden = channels // 2
        self.block = nn.Sequential(nn.ELU(), PaddedConv1d(channels, hidden, 3, dilation=dilation, causal=causal),
                                   nn.ELU(), PaddedConv1d(hidden, channels, 1, causal=causal))
        self.shortcut = PaddedConv1d(channels, channels, 1, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SkipLSTM(nn.Module):
    """LSTM over time on (B, C, T) with a residual connection."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, layers)

    @torch.compiler.disable  # the compiler does not trace RNNs: this runs eager between two compiled graphs
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # (T, B, C)
        y, _ = self.lstm(seq)
        return (y + seq).permute(1, 2, 0)


class SEANetEncoder(nn.Module):
    """(B, T) waveform -> (B, dim, ceil(T / prod(strides))) tokens."""

    def __init__(self, dim: int, filters: int = 32, strides: list[int] = (8, 5, 4, 2), residual_layers: int = 1,
                 lstm_layers: int = 2, causal: bool = True):
        super().__init__()
        if dim <= 0 or filters <= 0 or residual_layers < 0 or lstm_layers < 0:
            raise ValueError(f"SEANet dim={dim}, encoder_filters={filters} must be > 0 and "
                             f"residual_layers={residual_layers}, lstm_layers={lstm_layers} >= 0")
        if not strides or any(s < 1 for s in strides):
            raise ValueError(f"model.audio.strides={list(strides)} must be a non-empty list of integers >= 1")
        self.hop = math.prod(strides)
        width = filters
        layers: list[nn.Module] = [PaddedConv1d(1, width, 7, causal=causal)]
        for stride in reversed(list(strides)):  # the reference lists decoder (upsampling) order
            layers += [SEANetResidualBlock(width, 2 ** j, causal) for j in range(residual_layers)]
            layers += [nn.ELU(), PaddedConv1d(width, 2 * width, 2 * stride, stride=stride, causal=causal)]
            width *= 2
        self.lstm_index = len(layers) if lstm_layers else None
        if lstm_layers:
            layers.append(SkipLSTM(width, lstm_layers))
        layers += [nn.ELU(), PaddedConv1d(width, dim, 7, causal=causal)]
        self.model = nn.Sequential(*layers)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"the audio encoder takes (batch, samples) waveforms, got shape {tuple(wave.shape)}")
        pad = -wave.shape[-1] % self.hop  # to a multiple of the hop: every strided conv divides exactly
        x = F.pad(wave, (0, pad)).unsqueeze(1)
        if self.lstm_index is None:
            return self.model(x)
        # The eager LSTM is called here, not inside nn.Sequential's loop: the compiler cannot resume a graph
        # inside a loop, and a break there made it compile every layer call as a graph of its own (one per
        # channel width, recompiled for each), with no fusion between layers
        i = self.lstm_index
        return self.model[i + 1:](self.model[i](self.model[:i](x)))


class PrenetResBlock(nn.Module):
    """x + conv3(dropout(swish(GN(conv3(swish(GN(x))))))), the pre-net's residual block."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(channels, PRENET_WIDTH)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels, PRENET_WIDTH)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class SelfAttention1d(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v) over time, one head, GroupNorm in front."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels, PRENET_WIDTH)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).transpose(1, 2).chunk(3, dim=-1)  # (B, T, C) each
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2))


class ConvNeXtBlock(nn.Module):
    """x + gamma * pw2(GELU(pw1(LN(dwconv7(x))))), Vocos' 1-D ConvNeXt block."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class ISTFTHead(nn.Module):
    """(B, T', dim) -> (B, T' * hop): linear to log-magnitude and phase, inverse STFT with "same" padding.

    torch.istft only offers centre padding (its NOLA check fails at unpadded edges), so the inverse is
    written out: irfft per frame, Hann window, overlap-add, division by the summed squared window, and
    (n_fft - hop) / 2 samples trimmed from each end. Runs in fp32 whatever autocast is active.
    """

    def __init__(self, dim: int, n_fft: int, hop: int):
        super().__init__()
        if (n_fft - hop) % 2 or hop > n_fft:
            raise ValueError(f"model.audio.n_fft={n_fft} and hop={hop}: need hop <= n_fft and an even n_fft - hop")
        self.n_fft, self.hop = n_fft, hop
        self.out = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @torch.compiler.disable  # inductor's FFT kernels failed their stride checks (torch 2.11): eager, fp32
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with autocast_off(h.device):
            log_mag, phase = self.out(h.float()).transpose(1, 2).chunk(2, dim=1)  # (B, n_fft/2+1, T') each
            magnitude = log_mag.exp().clamp(max=1e2)  # the reference's guard against huge magnitudes
            spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
            frames = torch.fft.irfft(spectrum, self.n_fft, dim=1) * self.window[:, None]  # (B, n_fft, T')
            return self._overlap_add(frames)

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        n_frames = frames.shape[-1]
        length = (n_frames - 1) * self.hop + self.n_fft
        wave = self._add_shifted(frames)
        envelope = self._add_shifted(self.window.square()[None, :, None].expand(1, -1, n_frames))[0]
        trim = (self.n_fft - self.hop) // 2
        return wave[:, trim:length - trim] / envelope[trim:length - trim]

    def _add_shifted(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, n_fft, L) frames, frame l starting at sample l * hop -> (B, (L - 1) * hop + n_fft) summed.

        Each frame is cut into hop-long pieces; piece j of every frame lands j hops later, so the sum is
        ceil(n_fft / hop) shifted, whole-batch additions. (F.fold computes the same sum, but its CUDA kernels
        and their backward, im2col, loop over the batch: 8 ms of an audio_262k step at batch 80 on an H200.)"""
        batch, n_fft, n_frames = frames.shape
        pieces = math.ceil(n_fft / self.hop)
        cut = F.pad(frames, (0, 0, 0, pieces * self.hop - n_fft)).view(batch, pieces, self.hop, n_frames)
        cut = cut.transpose(2, 3)  # (B, pieces, L, hop)
        total = sum(F.pad(cut[:, j], (0, 0, j, pieces - 1 - j)) for j in range(pieces))  # (B, L + pieces - 1, hop)
        return total.reshape(batch, -1)[:, : (n_frames - 1) * self.hop + n_fft]


class VocosDecoder(nn.Module):
    """(B, dim, T') tokens -> (B, T' * hop) waveform."""

    def __init__(self, in_dim: int, dim: int = 768, intermediate_dim: int = 2304, num_blocks: int = 12,
                 n_fft: int = 1280, hop: int = 320, prenet: bool = True, prenet_dropout: float = 0.1):
        super().__init__()
        if min(in_dim, dim, intermediate_dim, num_blocks) <= 0:
            raise ValueError(f"Vocos decoder sizes in_dim={in_dim}, decoder_dim={dim}, "
                             f"intermediate_dim={intermediate_dim}, num_blocks={num_blocks} must all be > 0")
        if prenet:
            group_norm(dim, PRENET_WIDTH)  # checks the width before anything is built
        self.embed = nn.Conv1d(in_dim, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1.0 / num_blocks) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_trunc_normal_init)  # as Vocos; the pre-net below keeps PyTorch's default init, as the reference
        self.prenet = nn.Sequential(
            PrenetResBlock(dim, prenet_dropout), PrenetResBlock(dim, prenet_dropout), SelfAttention1d(dim),
            PrenetResBlock(dim, prenet_dropout), PrenetResBlock(dim, prenet_dropout),
            group_norm(dim, PRENET_WIDTH)) if prenet else nn.Identity()
        self.head = ISTFTHead(dim, n_fft, hop)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.prenet(self.embed(z))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(h.transpose(1, 2)))


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class AudioAutoencoder(Autoencoder):
    """Autoencoder whose forward crops the decoder's hop-padded output back to the input length."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        x_hat, out = super().forward(x)
        return x_hat[..., :x.shape[-1]], out

    @property
    def last_layer(self) -> torch.Tensor:
        """The iSTFT head's linear weight (the layer that makes the spectrum)."""
        return self.decoder.head.out.weight


def build_audio_autoencoder(model_cfg: AudioModelConfig, quantizer: nn.Module) -> AudioAutoencoder:
    """SEANet encoder -> quantizer -> Vocos decoder, tokens of width quantizer.dim."""
    hop = math.prod(model_cfg.strides)
    if model_cfg.hop != hop:
        raise ValueError(f"model.audio.hop={model_cfg.hop} must equal the product of model.audio.strides="
                         f"{model_cfg.strides} ({hop}): one token per hop samples")
    encoder = SEANetEncoder(quantizer.dim, model_cfg.encoder_filters, model_cfg.strides, model_cfg.residual_layers,
                            model_cfg.lstm_layers, model_cfg.causal)
    decoder = VocosDecoder(quantizer.dim, model_cfg.decoder_dim, model_cfg.intermediate_dim, model_cfg.num_blocks,
                           model_cfg.n_fft, model_cfg.hop, model_cfg.prenet, model_cfg.prenet_dropout)
    return AudioAutoencoder(encoder, quantizer, decoder)
