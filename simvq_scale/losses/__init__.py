"""Training losses: perceptual (LPIPS), adversarial terms, audio terms, and the per-modality objectives
(gan_image, gan_audio) that simvq_scale.modality builds."""
