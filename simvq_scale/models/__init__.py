"""Encoders, decoders, the autoencoder glue and discriminators; models take a quantizer, never build one."""
