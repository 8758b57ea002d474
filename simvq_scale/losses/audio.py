"""Audio loss terms of the speech codec (Vocos/WavTokenizer, as the SimVQ audio code uses them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simvq_scale.models.audio import autocast_off

LOG_FLOOR = 1e-7  # the reference's safe_log clip


class LogMelSpectrogram(nn.Module):
    """(B, T) -> log(max(mel, floor)) of shape (B, n_mels, frames), natural log.

    The package's one log-mel: magnitude (power 1) of centred, reflect-padded frames, Hann window of n_fft,
    HTK mel scale 0 Hz .. sample_rate / 2 without band normalisation (torchaudio's MelSpectrogram defaults).
    The training loss uses it with the config's loss.mel_* settings and floor 1e-7 (LOG_FLOOR, the reference's
    safe_log); the evaluation's mel distance with its own settings (simvq_scale.eval.audio.EVAL_LOG_MEL).
    Always fp32 (no bf16 FFT), whatever autocast is active.
    """

    def __init__(self, sample_rate: int = 24000, n_fft: int = 1024, hop: int = 256, n_mels: int = 100,
                 floor: float = LOG_FLOOR):
        super().__init__()
        import torchaudio

        if min(sample_rate, n_fft, hop, n_mels) <= 0:
            raise ValueError(f"mel spectrogram sample_rate={sample_rate}, loss.mel_n_fft={n_fft}, "
                             f"loss.mel_hop={hop}, loss.mel_n_mels={n_mels} must all be > 0")
        self.floor = floor
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=True, power=1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with autocast_off(wave.device):
            return self.transform(wave.float()).clamp(min=self.floor).log()


def mel_loss(log_mel: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean |log-mel(x) - log-mel(x_hat)|."""
    return F.l1_loss(log_mel(x_hat), log_mel(x))


def mel_l1_per_clip(log_mel: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) mean |log-mel(x) - log-mel(x_hat)| of each clip (mel_loss per clip, for validation)."""
    return (log_mel(x_hat) - log_mel(x)).abs().flatten(1).mean(1)


def hinge_generator_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over sub-discriminators of mean relu(1 - D(x_hat)) (the Vocos/WavTokenizer generator term)."""
    return torch.stack([F.relu(1.0 - l.float()).mean() for l in logits]).mean()


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over sub-discriminators of the sum over their layers of mean |f_real - f_fake| (real detached)."""
    per_discriminator = [sum((r.detach().float() - f.float()).abs().mean() for r, f in zip(rs, fs))
                         for rs, fs in zip(real, fake, strict=True)]
    return torch.stack(per_discriminator).mean()
