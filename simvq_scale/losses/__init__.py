"""Training losses: perceptual (LPIPS), adversarial (PatchGAN hinge / non-saturating)."""
