"""Encoders, decoders, the autoencoder glue and discriminators; models take a quantizer, never build one.
Which models a run uses is the modality's answer (simvq_scale.modality)."""
