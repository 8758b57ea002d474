"""What a modality's evaluator is, and the pieces evaluators share: metric-network options, reduced means.

Each modality names its evaluator (simvq_scale.modality: `Modality.evaluator_class()`): eval/image.py's
ImageEvaluator, eval/audio.py's AudioEvaluator. An evaluator sees every (input, reconstruction) batch of
its rank and returns figures reduced over all ranks; its class says which figures it reports (METRICS, in
table order), which of them --skip may leave out, how each is computed (NOTES) and which go into the
quantizer comparison's table (TABLE_COLUMNS). The runner (runner.py) asks the modality, never branches on it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from simvq_scale.config import DataConfig
from simvq_scale.distributed import all_reduce_sum
from simvq_scale.pretrained import FETCH_COMMAND

CODEBOOK_METRICS = ("utilization", "perplexity")  # every report's first figures, whatever the modality
CODEBOOK_NOTES = {
    "utilization": "fraction of the K codes chosen at least once over the evaluation set (the paper's definition)",
    "perplexity": "exp(entropy) of the code frequencies over the evaluation set",
}


@dataclass
class MetricNetworks:
    """Local files of the metric networks ("" = the default file in simvq_scale.pretrained.weights_dir())."""

    lpips_vgg: str = ""
    lpips_alex: str = ""
    fid_inception: str = ""
    utmos_weights: str = ""  # no default: UTMOS runs only when given
    skip: tuple[str, ...] = field(default_factory=tuple)  # metric names not to compute
    ssim_convention: str = "paper"  # a key of eval.image.SSIM_CONVENTIONS

    def __post_init__(self):
        skippable = skippable_metrics()
        unknown = sorted(set(self.skip) - set(skippable))
        if unknown:
            raise ValueError(f"--skip {','.join(unknown)}: not a skippable metric; choose from {', '.join(skippable)}")
        for evaluator in evaluator_classes():
            evaluator.check_networks(self)


class Evaluator(abc.ABC):
    """Reconstruction metrics of one modality over an evaluation set, reduced over all ranks."""

    METRICS: ClassVar[tuple[str, ...]]  # the figures it reports, in table order (after utilization, perplexity)
    SKIPPABLE: ClassVar[tuple[str, ...]]  # those --skip may leave out
    NOTES: ClassVar[dict[str, str]]  # how each figure is computed (the instance's `notes` add run-dependent ones)
    TABLE_COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]]  # (figure, heading, format) in the comparison table
    COMPARISON_NOTE: ClassVar[str]  # what a reader needs to compare the comparison table with other tables

    def __init__(self, device: torch.device, networks: MetricNetworks, data: DataConfig):
        self.unavailable: dict[str, str] = {}  # metric -> why it has no figure
        self.conventions: dict[str, str] = {}  # metric -> the convention its figure follows
        self.notes: dict[str, str] = {}  # notes that depend on the options or on the data seen

    @classmethod
    def check_networks(cls, networks: MetricNetworks) -> None:
        """Refuse options of `networks` this evaluator cannot honour (ValueError naming the option)."""

    @abc.abstractmethod
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add a batch of inputs and their reconstructions (as the tokenizer returns them)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float | None]:
        """The figures over every rank's batches (collective: every rank calls it)."""


def evaluator_classes() -> list[type[Evaluator]]:
    """The evaluator of every registered modality."""
    from simvq_scale.modality import get_modality, modality_names  # lazy: the modalities import the evaluators

    return [get_modality(name).evaluator_class() for name in modality_names()]


def skippable_metrics() -> tuple[str, ...]:
    """Every metric name --skip accepts, over all modalities."""
    return tuple(dict.fromkeys(name for cls in evaluator_classes() for name in cls.SKIPPABLE))


def optional_network(metric: str, option: str, path: str, build: Callable[[str], object],
                     networks: MetricNetworks, unavailable: dict[str, str]):
    """build(path), or None with unavailable[metric] saying why. An explicit missing path raises."""
    if metric in networks.skip:
        unavailable[metric] = "skipped (--skip)"
        return None
    try:
        return build(path)
    except FileNotFoundError as e:
        if path:
            raise FileNotFoundError(f"{option}={path}: {e}") from None
        unavailable[metric] = (f"unavailable (no weights file; pass {option} PATH or run `{FETCH_COMMAND}`): {e}")
        return None


class MeanSums:
    """Sums and counts of per-sample values under fixed names, reduced over ranks into means."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.table = torch.zeros(len(names), 2, dtype=torch.float64, device=device)

    def add(self, name: str, values: torch.Tensor | list[float | None]) -> None:
        if not isinstance(values, torch.Tensor):
            values = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        values = values.detach().double().to(self.table.device)
        row = self.names.index(name)
        self.table[row, 0] += values.sum()
        self.table[row, 1] += values.numel()

    def reduce(self) -> dict[str, tuple[float | None, int]]:
        """name -> (global mean or None when nothing was counted, global count)."""
        total = all_reduce_sum(self.table.clone()).cpu()
        return {n: (float(s / c) if c > 0 else None, int(c)) for n, (s, c) in zip(self.names, total.tolist())}
