"""Quantizers behind one interface (base.Quantizer), built by name: build_quantizer(cfg.quantizer).

Importing the package imports every kind's module, and with it its @register_quantizer builder.
"""

from simvq_scale.quant import fc, fsq, lc, lfq, simvq, vq, vq_ema  # noqa: F401 - each registers its kind
from simvq_scale.quant.registry import build_quantizer, register_quantizer, registered_kinds

__all__ = ["build_quantizer", "register_quantizer", "registered_kinds"]
