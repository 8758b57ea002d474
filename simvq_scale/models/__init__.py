"""Encoders, decoders, the autoencoder glue and discriminators; models take a quantizer, never build one."""

from torch import nn

from simvq_scale.config import Config


def build_generator(cfg: Config, quantizer: nn.Module) -> nn.Module:
    """The autoencoder (encoder -> quantizer -> decoder) for cfg.data.modality."""
    if cfg.data.modality == "image":
        from simvq_scale.models.image import build_image_autoencoder

        return build_image_autoencoder(cfg.model.image, quantizer)
    if cfg.data.modality == "audio":
        from simvq_scale.models.audio import build_audio_autoencoder

        return build_audio_autoencoder(cfg.model.audio, quantizer)
    raise ValueError(f"no generator for data.modality={cfg.data.modality!r}")
