"""The speech codec's two objectives: the generator's and the discriminator's.

Generator: mel_weight * L1 log-mel + commit_weight * quantizer loss
           + adv_weight * (hinge adversarial + feature_matching_weight * feature matching),
the adversarial and feature-matching terms summed over the discriminator groups (MPD, MRD), each
group the mean over its sub-discriminators (as the reference's loss: loss/len per group, MRD weight 1).
Discriminator: per group the mean over its sub-discriminators of the hinge loss on (x, sg(x_hat)),
summed over groups. Each returns the loss to backpropagate and its parts as detached fp32 device
scalars under the TensorBoard tag names (same interface as gan_image.ImageGANObjective).
"""

from __future__ import annotations

import torch
from torch import nn

from simvq_scale.config import LossConfig
from simvq_scale.losses.adversarial import hinge_d_loss
from simvq_scale.losses.audio import LogMelSpectrogram, hinge_generator_loss, mel_loss
from simvq_scale.quant.base import QuantizerOutput


class AudioGANObjective(nn.Module):
    def __init__(self, cfg: LossConfig, sample_rate: int):
        super().__init__()
        self.cfg = cfg
        self.log_mel = LogMelSpectrogram(sample_rate, cfg.mel_n_fft, cfg.mel_hop, cfg.mel_n_mels)

    def networks(self) -> dict[str, nn.Module]:
        """The objective's own networks (as gan_image's): none, the mel loss is FFTs."""
        return {}

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, quant: QuantizerOutput,
                       discriminator: nn.Module | None, last_layer: torch.Tensor | None = None):
        """last_layer is unused: the audio adversarial weight is fixed, as in the reference."""
        cfg = self.cfg
        mel = mel_loss(self.log_mel, x, x_hat)
        total = cfg.mel_weight * mel + cfg.commit_weight * quant.loss
        g_adv = mel.new_zeros(())
        matching = mel.new_zeros(())
        if discriminator is not None:  # switched on from loss.disc_start
            # one forward, per-sample sub-discriminators; the feature matching is computed inside D
            both = discriminator(torch.cat([x, x_hat]), match_halves=True)
            for logits, group_matching in both.values():
                g_adv = g_adv + hinge_generator_loss([l.chunk(2)[1] for l in logits])
                matching = matching + group_matching
            total = total + cfg.adv_weight * (g_adv + cfg.feature_matching_weight * matching)
        parts = {"loss/total_g": total, "loss/mel": mel, "loss/feature_matching": matching,
                 "loss/g_adv": g_adv, "loss/commit": quant.loss}
        return total, {k: v.detach().float() for k, v in parts.items()}

    def discriminator_loss(self, discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor):
        # one D forward on real and fake together (every sub-discriminator is per-sample): half the launches
        both = discriminator(torch.cat([x, x_hat.detach()]))
        pairs = {g: [logits.float().chunk(2) for logits in out[0]] for g, out in both.items()}
        # hinge_d_loss is 0.5 * (relu(1 - real) + relu(1 + fake)), half the reference's sum: a constant
        # factor to which Adam's update is (up to its epsilon) invariant
        loss = sum(torch.stack([hinge_d_loss(r, f) for r, f in pairs[g]]).mean() for g in pairs)
        logits = [pair for g in pairs for pair in pairs[g]]
        return loss, {"loss/d": loss.detach(),
                      "disc/logits_real": torch.stack([r.detach().mean() for r, _ in logits]).mean(),
                      "disc/logits_fake": torch.stack([f.detach().mean() for _, f in logits]).mean()}
