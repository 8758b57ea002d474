"""Images: (3, S, S) crops in [-1, 1]; VQGAN-style conv autoencoder, PatchGAN, L1 + LPIPS + GAN."""

from __future__ import annotations

from simvq_scale.config import require
from simvq_scale.modality.base import Modality, register_modality

RGB = 3  # the loader decodes every image to RGB
RECON_GRID_IMAGES = 8


@register_modality
class ImageModality(Modality):
    name = "image"
    recon_loss_tag = "loss/recon"
    sample_noun = "img"

    def check_config(self, cfg):
        from simvq_scale.data.decode import RESAMPLING
        from simvq_scale.models.discriminators import DISCRIMINATOR_NORMS
        from simvq_scale.models.norms import NORM_GROUPS

        m, d, size = cfg.model.image, cfg.model.discriminator, cfg.data.image_size
        require(m.channels > 0 and m.num_res_blocks > 0,
                f"model.image.channels={m.channels} and num_res_blocks={m.num_res_blocks} must be > 0")
        require(bool(m.channel_mult) and all(k > 0 for k in m.channel_mult),
                f"model.image.channel_mult={m.channel_mult} must be a non-empty list of positive integers")
        widths = sorted({m.channels * k for k in m.channel_mult})
        require(all(w % NORM_GROUPS == 0 for w in widths),
                f"model.image.channels={m.channels} * channel_mult={m.channel_mult} makes widths {widths}; "
                f"GroupNorm needs multiples of {NORM_GROUPS}")
        require(cfg.data.image_resample in RESAMPLING,
                f"data.image_resample={cfg.data.image_resample!r} is not one of {'|'.join(RESAMPLING)}")
        downsampling = 2 ** (len(m.channel_mult) - 1)
        require(size > 0 and size % downsampling == 0,
                f"data.image_size={size} must be a positive multiple of {downsampling}, the encoder's downsampling "
                f"(2^(len(model.image.channel_mult) - 1) for channel_mult={m.channel_mult})")
        require(d.layers >= 1 and d.channels > 0,
                f"model.discriminator.layers={d.layers} must be >= 1 and channels={d.channels} > 0")
        require(d.norm in DISCRIMINATOR_NORMS,
                f"model.discriminator.norm={d.norm!r} is not one of {'|'.join(DISCRIMINATOR_NORMS)}")
        widths = sorted({d.channels * min(2**n, 8) for n in range(1, d.layers + 1)})
        require(d.norm != "group" or all(w % NORM_GROUPS == 0 for w in widths),
                f"model.discriminator.channels={d.channels} makes normalised widths {widths} (channels * "
                f"min(2^n, 8)); model.discriminator.norm=group needs multiples of {NORM_GROUPS}")
        side = size
        for _ in range(d.layers):
            side //= 2  # a 4x4 stride-2 conv with padding 1
        require(side >= 3, f"model.discriminator.layers={d.layers} halves data.image_size={size} to {side} pixels; "
                f"the PatchGAN's last two 4x4 convs need at least 3: use fewer layers or larger images")
        require(cfg.loss.recon_weight >= 0 and cfg.loss.perceptual_weight >= 0,
                f"loss.recon_weight={cfg.loss.recon_weight} and loss.perceptual_weight={cfg.loss.perceptual_weight} "
                "must be >= 0")

    def check_pretrained(self, cfg):
        if cfg.loss.perceptual_weight > 0:  # the objective loads LPIPS only then (losses/gan_image.py)
            from simvq_scale.pretrained import lpips_weights_file

            lpips_weights_file(cfg.loss.perceptual_weights)

    def sample_shape(self, data):
        return (RGB, data.image_size, data.image_size)

    def decode(self, data, sample, train, rng):
        from simvq_scale.data.decode import decode_image

        return decode_image(sample, data.image_size, train, data.random_resize, rng, data.image_resample)

    def channels_last(self, cfg):
        return cfg.model.channels_last

    def build_generator(self, cfg, quantizer):
        from simvq_scale.models.image import build_image_autoencoder

        return build_image_autoencoder(cfg.model.image, quantizer, RGB)

    def build_discriminator(self, cfg):
        from simvq_scale.models.discriminators import PatchGANDiscriminator

        d = cfg.model.discriminator
        return PatchGANDiscriminator(RGB, d.channels, d.layers, d.norm)

    def build_objective(self, cfg):
        from simvq_scale.losses.gan_image import ImageGANObjective

        return ImageGANObjective(cfg.loss)

    def evaluator_class(self):
        from simvq_scale.eval.image import ImageEvaluator

        return ImageEvaluator

    def read_file(self, path, data):
        """Scaled (shorter side) and center-cropped to data.image_size, as the evaluation loader does."""
        import numpy as np

        from simvq_scale.data.decode import IMAGE_FIELDS, BadSample, decode_image

        suffix = path.suffix.lower().lstrip(".")
        field = suffix if suffix in IMAGE_FIELDS else "png"  # PIL detects the format from the bytes
        try:
            return decode_image({"__key__": str(path), field: path.read_bytes()}, data.image_size, False, False,
                                np.random.default_rng(0), data.image_resample)
        except BadSample as e:
            raise ValueError(f"cannot read image {path}: {e}") from None

    def write_reconstruction(self, out, stem, x, x_hat, data):
        """<stem>.compare.png (original | reconstruction) and <stem>.recon.png."""
        from PIL import Image

        from simvq_scale.eval.image import to_unit

        def to_pil(image):
            return Image.fromarray((to_unit(image) * 255).round().byte().permute(1, 2, 0).numpy())

        side = Image.new("RGB", (2 * x.shape[-1], x.shape[-2]))
        side.paste(to_pil(x), (0, 0))
        side.paste(to_pil(x_hat), (x.shape[-1], 0))
        written = [out / f"{stem}.compare.png", out / f"{stem}.recon.png"]
        side.save(written[0])
        to_pil(x_hat).save(written[1])
        return written

    def fidelity(self, x, x_hat, data):
        from simvq_scale.eval.image import psnr_per_image

        return f"PSNR {float(psnr_per_image(x[None], x_hat[None])):.2f} dB"

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
