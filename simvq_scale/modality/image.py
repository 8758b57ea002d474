"""Images: (3, S, S) crops in [-1, 1]; VQGAN-style conv autoencoder, PatchGAN, L1 + LPIPS + GAN."""

from __future__ import annotations

from simvq_scale.modality.base import Modality, register_modality

RGB = 3  # the loader decodes every image to RGB
RECON_GRID_IMAGES = 8


@register_modality
class ImageModality(Modality):
    name = "image"
    recon_loss_tag = "loss/recon"
    sample_noun = "img"

    def sample_shape(self, data):
        return (RGB, data.image_size, data.image_size)

    def decode(self, data, sample, train, rng):
        from simvq_scale.data.decode import decode_image

        return decode_image(sample, data.image_size, train, data.random_resize, rng)

    def build_generator(self, cfg, quantizer):
        from simvq_scale.models.image import build_image_autoencoder

        return build_image_autoencoder(cfg.model.image, quantizer, RGB)

    def build_discriminator(self, cfg):
        from simvq_scale.models.discriminators import PatchGANDiscriminator

        d = cfg.model.discriminator
        return PatchGANDiscriminator(RGB, d.channels, d.layers)

    def build_objective(self, cfg):
        from simvq_scale.losses.gan_image import ImageGANObjective

        return ImageGANObjective(cfg.loss)

    def log_reconstructions(self, logger, step, x, x_hat, cfg, objective):
        """One grid: the inputs in the top row, their reconstructions below."""
        import torch
        import torchvision

        n = min(RECON_GRID_IMAGES, x.shape[0])
        grid = torchvision.utils.make_grid(torch.cat([x[:n].float(), x_hat[:n].float()]).add(1).div(2), nrow=n)
        logger.image(step, "recon/images", grid)

    def validation_figures(self, x, x_hat, objective):
        """val/recon: L1 in [-1, 1] units (loss/recon's measure) and val/psnr: PSNR on [0, 1] in dB (the
        evaluation's), per image."""
        from simvq_scale.eval.image import psnr_per_image

        x, x_hat = x.float(), x_hat.float()
        return {"val/recon": (x - x_hat).abs().flatten(1).mean(1), "val/psnr": psnr_per_image(x, x_hat)}
