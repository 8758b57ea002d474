"""GAN loss terms as the SimVQ reference (taming's vqperceptual.py, SimVQ variant) uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss of the SimVQ code (`non_saturate_gen_loss`):
    mean over the batch of softplus(-l), l = the sample's patch logits averaged, i.e. the
    cross-entropy of the per-sample mean logit against the label "real". (taming's original
    generator term is -mean(logits); SimVQ's config trains with this one, hinge D loss.)"""
    per_sample = logits_fake.reshape(logits_fake.shape[0], -1).mean(dim=1)
    return F.softplus(-per_sample).mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming's calculate_adaptive_weight: |grad nll| / (|grad g| + 1e-4) at the decoder's last
    layer, clamped to [0, max_weight], detached. Both losses must still hold their graphs."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()

