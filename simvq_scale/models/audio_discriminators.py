"""The speech codec's discriminators, as WavTokenizer/Vocos (and the SimVQ audio code) build them.

Multi-period (HiFi-GAN): for each period p the waveform is folded to (T/p, p) and run through
weight-normalised (5, 1) convs with stride 3. Multi-resolution (UniVNet): for each (n_fft, hop, win)
the magnitude STFT (rectangular window, centred, as the reference) goes through 2-D convs.
Every sub-discriminator returns its logits and its feature maps (for feature matching).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from simvq_scale.config import AudioModelConfig
from simvq_scale.losses.audio import feature_matching_loss
from simvq_scale.models.audio import autocast_off

LRELU_SLOPE = 0.1

# (logits of each sub-discriminator, feature maps of each sub-discriminator or, with match_halves, the group's
# feature-matching loss)
DiscriminatorOutput = tuple[list[torch.Tensor], list[list[torch.Tensor]] | torch.Tensor]


class PeriodDiscriminator(nn.Module):
    """(B, T) -> logits (B, n) and feature maps, on the waveform folded by `period`."""

    def __init__(self, period: int, channels: list[int], kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        widths = [1, *channels]
        pad = (kernel_size // 2, 0)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (stride if i < len(channels) - 1 else 1, 1), pad))
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])))
        self.conv_post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pad = -wave.shape[-1] % self.period
        if pad:
            wave = F.pad(wave.unsqueeze(1), (0, pad), mode="reflect").squeeze(1)
        x = wave.view(wave.shape[0], 1, -1, self.period)
        features = []
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            if i > 0:  # the reference matches every layer's features but the first
                features.append(x)
        x = self.conv_post(x)
        features.append(x)
        return x.flatten(1), features


class ResolutionDiscriminator(nn.Module):
    """(B, 1, freq, frames) magnitude STFT at its resolution (`spectrogram(wave)`) -> logits (B, n) and
    feature maps."""

    def __init__(self, resolution: list[int], channels: int = 64):
        super().__init__()
        if len(resolution) != 3:
            raise ValueError(f"model.audio.mrd_resolutions entry {resolution} must be [n_fft, hop, win]")
        self.n_fft, self.hop, self.win = resolution
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (7, 5), (2, 2), padding=(3, 2))),
            weight_norm(nn.Conv2d(channels, channels, (5, 3), (2, 1), padding=(2, 1))),
            weight_norm(nn.Conv2d(channels, channels, (5, 3), (2, 2), padding=(2, 1))),
            weight_norm(nn.Conv2d(channels, channels, 3, (2, 1), padding=1)),
            weight_norm(nn.Conv2d(channels, channels, 3, (2, 2), padding=1)),
        ])
        self.conv_post = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        with autocast_off(wave.device):  # no bf16 FFT; the magnitude in fp32
            rectangular = torch.ones(self.win, device=wave.device)  # the reference's window=None, made explicit
            spec = torch.stft(wave.float(), self.n_fft, self.hop, self.win, window=rectangular, center=True,
                              return_complex=True).abs()
        return spec.unsqueeze(1)  # (B, 1, freq, frames)

    def forward(self, spectrogram: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = spectrogram
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            features.append(x)
        x = self.conv_post(x)
        features.append(x)
        return x.flatten(1), features


class AudioDiscriminator(nn.Module):
    """MPD + MRD in one module: forward(wave (B, T)) -> {"mpd": outputs, "mrd": outputs}, each the list
    of its sub-discriminators' logits and the list of their feature-map lists; forward(wave, match_halves=True)
    for the generator's step, each group's feature-matching loss in place of its maps."""

    def __init__(self, periods: list[int], mpd_channels: list[int], resolutions: list[list[int]],
                 mrd_channels: int = 64):
        super().__init__()
        if not periods or any(p < 1 for p in periods) or not mpd_channels or not resolutions:
            raise ValueError(f"model.audio.mpd_periods={periods} (each >= 1), mpd_channels={mpd_channels} and "
                             f"mrd_resolutions={resolutions} must be non-empty")
        self.mpd = nn.ModuleList(PeriodDiscriminator(p, list(mpd_channels)) for p in periods)
        self.mrd = nn.ModuleList(ResolutionDiscriminator(list(r), mrd_channels) for r in resolutions)

    # Eager and fp32: inductor's FFT kernels failed their stride checks (torch 2.11). One call for every
    # resolution, from the top of forward: the compiler cannot resume a graph inside a loop, and a break in
    # the loop over sub-discriminators made it compile each of them (and each period) as graphs of their own
    @torch.compiler.disable
    def spectrograms(self, wave: torch.Tensor) -> list[torch.Tensor]:
        return [d.spectrogram(wave) for d in self.mrd]

    def forward(self, wave: torch.Tensor, match_halves: bool = False) -> dict[str, DiscriminatorOutput]:
        """match_halves: `wave` is [real; fake] and each group's feature maps are replaced by the feature-matching
        loss between its halves (real detached), computed here: inside the compiled graph the maps keep one
        layout, where as the graph's outputs their NCHW gradients came back and were copied to channels-last."""
        if wave.dim() != 2:
            raise ValueError(f"the audio discriminator takes (batch, samples) waveforms, got {tuple(wave.shape)}")
        spectrograms = self.spectrograms(wave)
        groups = {}
        for name, outputs in (("mpd", [d(wave) for d in self.mpd]),
                              ("mrd", [d(spec) for d, spec in zip(self.mrd, spectrograms)])):
            features = [maps for _, maps in outputs]
            if match_halves:
                features = feature_matching_loss([[f.chunk(2)[0] for f in maps] for maps in features],
                                                 [[f.chunk(2)[1] for f in maps] for maps in features])
            groups[name] = ([logits for logits, _ in outputs], features)
        return groups


def build_audio_discriminator(model_cfg: AudioModelConfig) -> AudioDiscriminator:
    return AudioDiscriminator(model_cfg.mpd_periods, model_cfg.mpd_channels, model_cfg.mrd_resolutions,
                              model_cfg.mrd_channels)
