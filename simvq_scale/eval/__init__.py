"""Reconstruction and codebook metrics for the tools: image.py, audio.py, and the runner that applies them
over an evaluation shard set on one or many processes."""
