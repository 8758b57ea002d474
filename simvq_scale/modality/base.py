"""What a modality is: every question the trainer, data, evaluation and tools ask about images or audio.

A modality is one object registered by name (`data.modality` in the config). Adding one (say video) is
one new module here that subclasses Modality and calls `register_modality` (and is imported by this
package's __init__), plus its config section, models, objective and evaluator; nothing else branches on
the modality. The builders import their models lazily, so looking a modality up (config validation, light
tools) stays cheap.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from simvq_scale.config import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    from simvq_scale.config import Config, DataConfig
    from simvq_scale.eval.evaluator import Evaluator
    from simvq_scale.train.logging import NoOpLogger


class Modality(abc.ABC):
    name: ClassVar[str]
    # the reconstruction loss the console and the hparams show ("loss/recon" for images, "loss/mel" for audio)
    recon_loss_tag: ClassVar[str]
    # what one sample is called in throughput lines ("img", "s of audio" ...) and its unit of measure per sample
    sample_noun: ClassVar[str]

    # ---- configuration
    @abc.abstractmethod
    def check_config(self, cfg: Config) -> None:
        """Every impossible value of the settings this modality reads (its model, data and loss keys) as a
        one-line ConfigError naming the key and value; Config.validate calls it. Sections of other modalities
        are inert and not checked."""

    def check_pretrained(self, cfg: Config) -> None:
        """The pretrained network files the objective will load exist (WeightsNotFoundError naming the setting);
        the preflight (train/preflight.py) calls it before anything is built."""

    # ---- data
    @abc.abstractmethod
    def sample_shape(self, data: DataConfig) -> tuple[int, ...]:
        """Shape of one decoded sample, without the batch dimension."""

    @abc.abstractmethod
    def decode(self, data: DataConfig, sample: dict, train: bool, rng: np.random.Generator) -> torch.Tensor:
        """Raw shard sample (bytes by field) -> tensor of sample_shape; raises data.decode.BadSample."""

    def samples_per_unit(self, data: DataConfig) -> float:
        """How many 'units' one sample is worth in throughput figures (1 image; segment_seconds of audio)."""
        return 1.0

    # ---- models and objective
    def channels_last(self, cfg: Config) -> bool:
        """Whether compiled networks run their convolutions NHWC (`model.channels_last`): a 2-D layout, so
        False unless the modality's networks are 2-D."""
        return False

    @abc.abstractmethod
    def build_generator(self, cfg: Config, quantizer: nn.Module) -> nn.Module:
        """The autoencoder (encoder -> quantizer -> decoder); forward(x) -> (x_hat, QuantizerOutput)."""

    @abc.abstractmethod
    def build_discriminator(self, cfg: Config) -> nn.Module:
        """The discriminator, called on batches of samples."""

    @abc.abstractmethod
    def build_objective(self, cfg: Config) -> nn.Module:
        """generator_loss(x, x_hat, quant, discriminator | None, last_layer) and discriminator_loss(D, x, x_hat)."""

    def describe(self, cfg: Config, tokens_per_sample: int, codebook_size: int) -> dict:
        """Extra `--dry-run` figures (e.g. the audio bitrate)."""
        return {}

    # ---- evaluation and tools
    @abc.abstractmethod
    def evaluator_class(self) -> type[Evaluator]:
        """The simvq_scale.eval evaluator of this modality's reconstructions (its figures, notes, table columns)."""

    @abc.abstractmethod
    def read_file(self, path: Path, data: DataConfig) -> torch.Tensor:
        """One media file as one model input without the batch dimension (tools/reconstruct.py); a ValueError
        naming the file and what this modality reads when it cannot be read."""

    @abc.abstractmethod
    def write_reconstruction(self, out: Path, stem: str, x: torch.Tensor, x_hat: torch.Tensor,
                             data: DataConfig) -> list[Path]:
        """Write input `x` and its reconstruction `x_hat` (one sample each, on the CPU, in [-1, 1]) under `out`
        as files named after `stem`, for a side-by-side look; returns the paths written."""

    @abc.abstractmethod
    def fidelity(self, x: torch.Tensor, x_hat: torch.Tensor, data: DataConfig) -> str:
        """How close `x_hat` is to `x` (one sample each), as a short phrase ("PSNR 23.10 dB")."""

    # ---- monitoring
    @abc.abstractmethod
    def log_reconstructions(self, logger: NoOpLogger, step: int, x: torch.Tensor, x_hat: torch.Tensor,
                            cfg: Config, objective: nn.Module) -> None:
        """Write inputs beside their (EMA) reconstructions to TensorBoard."""

    @abc.abstractmethod
    def validation_figures(self, x: torch.Tensor, x_hat: torch.Tensor, objective: nn.Module) -> dict[str, torch.Tensor]:
        """Per-sample reconstruction figures of a validation batch: {tag under val/: (B,) tensor}. The
        trainer averages each over the real (unpadded) samples of all ranks (train/validation.py)."""


_REGISTRY: dict[str, Modality] = {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make `cls.name` a valid `data.modality`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"modality {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def modality_names() -> list[str]:
    return sorted(_REGISTRY)


def get_modality(name: str) -> Modality:
    """The registered modality `name`; an unknown name is a one-line ConfigError."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"data.modality={name!r} is not one of {'|'.join(modality_names())}") from None
