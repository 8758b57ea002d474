"""The image autoencoder's two objectives: the generator's and the discriminator's.

Generator: L1 + LPIPS + commitment + adversarial (fixed weight, or taming's adaptive
weight). Discriminator: hinge on (x, sg(x_hat)). Each returns the loss to backpropagate
and its parts as detached device scalars under the TensorBoard tag names.
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.config import LossConfig
from simvq_scale.losses.adversarial import adaptive_weight, generator_adv_loss, hinge_d_loss
from simvq_scale.losses.perceptual import PerceptualLoss
from simvq_scale.quant.base import QuantizerOutput


class ImageGANObjective(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = PerceptualLoss(cfg.perceptual_weights) if cfg.perceptual_weight > 0 else None

    def networks(self) -> dict[str, nn.Module]:
        """The objective's own networks, each called as net(x, x_hat): compiled with the models and counted in
        the model FLOPs (LPIPS)."""
        return {} if self.perceptual is None else {"perceptual": self.perceptual}

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, quant: QuantizerOutput,
                       discriminator: nn.Module | None, last_layer: torch.Tensor | None):
        cfg = self.cfg
        recon = (x.float() - x_hat.float()).abs().mean()
        perceptual = self.perceptual(x, x_hat) if self.perceptual is not None else recon.new_zeros(())
        nll = cfg.recon_weight * recon + cfg.perceptual_weight * perceptual
        total = nll + cfg.commit_weight * quant.loss
        g_adv = recon.new_zeros(())
        if discriminator is not None:  # switched on from loss.disc_start
            g_adv = generator_adv_loss(discriminator(x_hat))
            weight = (adaptive_weight(nll, g_adv, last_layer) * cfg.adv_weight if cfg.adaptive_adv_weight
                      else cfg.adv_weight)
            total = total + weight * g_adv
        parts = {"loss/total_g": total, "loss/recon": recon, "loss/perceptual": perceptual,
                 "loss/commit": quant.loss, "loss/g_adv": g_adv}
        return total, {k: v.detach().float() for k, v in parts.items()}

    def discriminator_loss(self, discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor):
        # one D call on real and fake, normalised apart by a BatchNorm D (the PatchGAN's forward says why one call)
        logits_real, logits_fake = discriminator(torch.cat([x, x_hat.detach()]), batches=2).float().chunk(2)
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"loss/d": loss.detach(), "disc/logits_real": logits_real.detach().mean(),
                      "disc/logits_fake": logits_fake.detach().mean()}
