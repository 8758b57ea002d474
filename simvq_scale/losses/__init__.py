"""Training losses: perceptual (LPIPS), adversarial (PatchGAN hinge / non-saturating)."""

from torch import nn

from simvq_scale.config import Config


def build_objective(cfg: Config) -> nn.Module:
    """The generator and discriminator objectives for cfg.data.modality."""
    if cfg.data.modality == "image":
        from simvq_scale.losses.gan_image import ImageGANObjective

        return ImageGANObjective(cfg.loss)
    if cfg.data.modality == "audio":
        from simvq_scale.losses.gan_audio import AudioGANObjective

        return AudioGANObjective(cfg.loss, cfg.data.sample_rate)
    raise ValueError(f"no objective for data.modality={cfg.data.modality!r}")
