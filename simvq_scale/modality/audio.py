"""Speech: (T,) mono waveforms in [-1, 1]; SEANet encoder, Vocos decoder, MPD + MRD, mel + GAN."""

from __future__ import annotations

import math

from simvq_scale.modality.base import Modality, register_modality

RECON_CLIPS = 2
PAIR_GAP_SECONDS = 0.25  # silence between a clip and its reconstruction in one player


@register_modality
class AudioModality(Modality):
    name = "audio"
    recon_loss_tag = "loss/mel"
    sample_noun = "s of audio"

    def sample_shape(self, data):
        return (round(data.segment_seconds * data.sample_rate),)

    def samples_per_unit(self, data):
        return data.segment_seconds

    def decode(self, data, sample, train, rng):
        from simvq_scale.data.decode import decode_audio

        return decode_audio(sample, data.sample_rate, data.segment_seconds, train, data.random_gain_db, rng)

    def build_generator(self, cfg, quantizer):
        from simvq_scale.models.audio import build_audio_autoencoder

        return build_audio_autoencoder(cfg.model.audio, quantizer)

    def build_discriminator(self, cfg):
        from simvq_scale.models.audio_discriminators import build_audio_discriminator

        return build_audio_discriminator(cfg.model.audio)

    def build_objective(self, cfg):
        from simvq_scale.losses.gan_audio import AudioGANObjective

        return AudioGANObjective(cfg.loss, cfg.data.sample_rate)

    def describe(self, cfg, tokens_per_sample, codebook_size):
        """Bits per second of the token stream: tokens/s * log2(codebook size)."""
        tokens_per_second = tokens_per_sample / cfg.data.segment_seconds
        return {"tokens_per_second": tokens_per_second, "bitrate_bps": tokens_per_second * math.log2(codebook_size)}

    def log_reconstructions(self, logger, step, x, x_hat, cfg, objective):
        """A couple of clips, each one player holding the input, a short silence and the reconstruction;
        and their log-mels as one colour-mapped picture, each input above its labelled reconstruction."""
        import torch

        from simvq_scale.train.render import colormap, labelled_rows

        n = min(RECON_CLIPS, x.shape[0])
        rate = cfg.data.sample_rate
        gap = x.new_zeros(round(PAIR_GAP_SECONDS * rate))
        for i in range(n):
            logger.audio(step, f"recon/audio_{i}", torch.cat([x[i].float(), gap, x_hat[i].float()]), rate)
        mel, mel_hat = objective.log_mel(x[:n].float()), objective.log_mel(x_hat[:n].float())  # (n, mels, frames)
        low, high = mel.amin(), mel.amax()  # one scale, the input's range, so the two compare

        def panel(m):
            return colormap(((m.flip(0) - low) / (high - low).clamp(min=1e-6)))  # low frequencies at the bottom

        panels = [(f"clip {i}: {name} (log-mel, time ->)", panel(m[i])) for i in range(n)
                  for name, m in (("input", mel), ("reconstruction", mel_hat))]
        logger.image(step, "recon/mel", labelled_rows(panels))

    def validation_figures(self, x, x_hat, objective):
        """val/mel: L1 between log-mel spectrograms (loss/mel's measure), per clip."""
        from simvq_scale.losses.audio import mel_l1_per_clip

        return {"val/mel": mel_l1_per_clip(objective.log_mel, x.float(), x_hat.float())}
