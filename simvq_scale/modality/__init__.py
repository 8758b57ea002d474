"""Modalities registered by name: `get_modality(cfg.data.modality)` answers every modality question."""

from simvq_scale.modality import audio, image  # noqa: F401  (registration)
from simvq_scale.modality.base import Modality, get_modality, modality_names, register_modality

__all__ = ["Modality", "get_modality", "modality_names", "register_modality"]
