"""Speech: (T,) mono waveforms in [-1, 1]; SEANet encoder, Vocos decoder, MPD + MRD, mel + GAN."""

from __future__ import annotations

import math

from simvq_scale.config import require
from simvq_scale.modality.base import Modality, register_modality

RECON_CLIPS = 2
PAIR_GAP_SECONDS = 0.25  # silence between a clip and its reconstruction in one player
FILE_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")  # what tools/reconstruct.py reads (libsndfile)


@register_modality
class AudioModality(Modality):
    name = "audio"
    recon_loss_tag = "loss/mel"
    sample_noun = "s of audio"

    def channels_last(self, cfg):
        # the discriminators are 2-D: MPD folds the waveform into (T/p, p) planes, MRD convolves spectrograms
        return cfg.model.channels_last

    def check_config(self, cfg):
        from simvq_scale.models.norms import NORM_GROUPS

        a, data, loss = cfg.model.audio, cfg.data, cfg.loss
        require(a.encoder_filters > 0 and a.residual_layers >= 0 and a.lstm_layers >= 0,
                f"model.audio.encoder_filters={a.encoder_filters} must be > 0 and residual_layers={a.residual_layers}, "
                f"lstm_layers={a.lstm_layers} >= 0")
        require(bool(a.strides) and all(s >= 1 for s in a.strides),
                f"model.audio.strides={a.strides} must be a non-empty list of integers >= 1")
        require(a.hop == math.prod(a.strides), f"model.audio.hop={a.hop} must equal the product of "
                f"model.audio.strides={a.strides} ({math.prod(a.strides)}): one token per hop samples")
        require(a.hop <= a.n_fft and (a.n_fft - a.hop) % 2 == 0, f"model.audio.n_fft={a.n_fft} and hop={a.hop}: "
                "the iSTFT head needs hop <= n_fft and an even n_fft - hop")
        require(min(a.decoder_dim, a.intermediate_dim, a.num_blocks) > 0,
                f"model.audio.decoder_dim={a.decoder_dim}, intermediate_dim={a.intermediate_dim} and "
                f"num_blocks={a.num_blocks} must be > 0")
        require(not a.prenet or a.decoder_dim % NORM_GROUPS == 0,
                f"model.audio.decoder_dim={a.decoder_dim} with model.audio.prenet=true: the pre-net's GroupNorm "
                f"needs a multiple of {NORM_GROUPS}")
        require(0 <= a.prenet_dropout < 1, f"model.audio.prenet_dropout={a.prenet_dropout} must be in [0, 1)")
        require(bool(a.mpd_periods) and all(p >= 1 for p in a.mpd_periods),
                f"model.audio.mpd_periods={a.mpd_periods} must be a non-empty list of integers >= 1")
        require(bool(a.mpd_channels) and all(c > 0 for c in a.mpd_channels) and a.mrd_channels > 0,
                f"model.audio.mpd_channels={a.mpd_channels} (non-empty) and mrd_channels={a.mrd_channels} must be > 0")
        require(bool(a.mrd_resolutions), "model.audio.mrd_resolutions is empty: give at least one [n_fft, hop, win]")
        for entry in a.mrd_resolutions:
            require(len(entry) == 3 and min(entry) > 0 and entry[2] <= entry[0],
                    f"model.audio.mrd_resolutions entry {entry} must be [n_fft, hop, win], all > 0 and win <= n_fft")
        require(min(loss.mel_n_fft, loss.mel_hop, loss.mel_n_mels) > 0,
                f"loss.mel_n_fft={loss.mel_n_fft}, mel_hop={loss.mel_hop} and mel_n_mels={loss.mel_n_mels} must be > 0")
        require(loss.mel_weight >= 0 and loss.feature_matching_weight >= 0,
                f"loss.mel_weight={loss.mel_weight} and loss.feature_matching_weight={loss.feature_matching_weight} "
                "must be >= 0")
        require(data.sample_rate > 0 and data.segment_seconds > 0 and data.random_gain_db >= 0,
                f"data.sample_rate={data.sample_rate} and data.segment_seconds={data.segment_seconds} must be > 0 "
                f"and data.random_gain_db={data.random_gain_db} >= 0")
        # the centred STFTs (MRD, the mel loss) reflect-pad half a window on each side, which needs more samples
        window = max([loss.mel_n_fft] + [entry[0] for entry in a.mrd_resolutions])
        samples = self.sample_shape(data)[0]
        require(samples > window // 2, f"data.segment_seconds={data.segment_seconds} at data.sample_rate="
                f"{data.sample_rate} is {samples} samples; the STFTs of model.audio.mrd_resolutions and "
                f"loss.mel_n_fft need more than {window // 2}: lengthen the segment")

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

    def evaluator_class(self):
        from simvq_scale.eval.audio import AudioEvaluator

        return AudioEvaluator

    def read_file(self, path, data):
        """The whole file, mixed to mono and resampled to data.sample_rate."""
        import soundfile as sf
        import torch

        from simvq_scale.data.decode import to_mono_at_rate

        if path.suffix.lower() not in FILE_SUFFIXES:
            raise ValueError(f"{path}: an audio model takes {', '.join(FILE_SUFFIXES)} files")
        try:
            audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"cannot read audio {path}: {e}") from None
        return torch.from_numpy(to_mono_at_rate(audio, rate, data.sample_rate))

    def write_reconstruction(self, out, stem, x, x_hat, data):
        """<stem>.orig.wav and <stem>.recon.wav (16-bit, the model's rate)."""
        import soundfile as sf

        written = [out / f"{stem}.orig.wav", out / f"{stem}.recon.wav"]
        for path, wave in zip(written, (x, x_hat)):
            sf.write(path, wave.reshape(-1).numpy(), data.sample_rate, subtype="PCM_16")
        return written

    def fidelity(self, x, x_hat, data):
        from simvq_scale.eval.audio import MelDistance

        return f"mel distance {float(MelDistance(data.sample_rate)(x[None], x_hat.reshape(1, -1))):.3f}"

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
