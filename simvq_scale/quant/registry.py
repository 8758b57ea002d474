"""Quantizer kinds by name: each kind's module registers its builder, build_quantizer(cfg) looks it up.

    @register_quantizer("vq_ema")
    def build(cfg: QuantizerConfig) -> VQEMA: ...

The kinds themselves and their options are declared in config.py (QUANTIZER_KINDS and the
QuantizerConfig section of each kind's name), which stays torch-free; importing simvq_scale.quant
imports every kind's module, so every kind is registered before a build.
"""

from __future__ import annotations

from typing import Callable

from simvq_scale.config import QUANTIZER_KINDS, QuantizerConfig
from simvq_scale.quant.base import Quantizer

Builder = Callable[[QuantizerConfig], Quantizer]
_BUILDERS: dict[str, Builder] = {}


def register_quantizer(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: `builder(cfg) -> Quantizer` builds quantizer.kind == kind."""
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"quantizer kind {kind!r} is not declared in config.QUANTIZER_KINDS; declare it there "
                         "(with its options section in QuantizerConfig) first")

    def register(builder: Builder) -> Builder:
        if kind in _BUILDERS:
            raise ValueError(f"quantizer kind {kind!r} is registered twice ({_BUILDERS[kind].__module__} and "
                             f"{builder.__module__})")
        _BUILDERS[kind] = builder
        return builder

    return register


def registered_kinds() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    """The quantizer module of cfg.kind; impossible values raise config.ConfigError first.

    A sharded SimVQ codebook builds its process group here: call it on every rank, in the same order.
    """
    cfg.validate()
    if cfg.kind not in _BUILDERS:
        raise RuntimeError(f"quantizer.kind={cfg.kind!r} is declared in config.QUANTIZER_KINDS but no module "
                           "registered a builder for it (is it imported in simvq_scale/quant/__init__.py?)")
    return _BUILDERS[cfg.kind](cfg)
