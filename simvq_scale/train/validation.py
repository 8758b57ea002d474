"""Validation: the EMA generator's reconstruction figures on a fixed set of validation samples (val/ tags).

The set is the first train.val_samples samples of data.val_shards in shard order, so it is the same at any
world size; build_eval_loader splits it between the ranks, each sample read once, in full batches padded
with masked samples and the same batch count on every rank. Every rank therefore runs the same number of
forward passes with the same token count (the quantizer may be collective). The modality turns each batch
into per-sample figures; ONE all_reduce then sums the figures of the real samples and their count over the
ranks. That collective is the validation step's own, beside the log step's one (metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from simvq_scale.config import Config
from simvq_scale.data import build_eval_loader
from simvq_scale.distributed import world_size
from simvq_scale.modality import Modality


class Validation:
    def __init__(self, cfg: Config, modality: Modality, objective: nn.Module, device: torch.device,
                 batch_size: int, rank: int, world: int, console: Callable[[str], None]):
        self.cfg, self.modality, self.objective, self.device = cfg, modality, objective, device
        self.loader = build_eval_loader(cfg.data, cfg.data.val_shards, batch_size, rank, world, cfg.train.val_samples)
        held = sum(self.loader.stream.counts)
        if held < cfg.train.val_samples:
            console(f"validation: data.val_shards holds {held} samples, fewer than train.val_samples="
                    f"{cfg.train.val_samples}; all {held} are used")

    def due(self, step: int) -> bool:
        every = self.cfg.train.val_every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    @torch.no_grad()
    def run(self, step: int, reconstruct: Callable[[torch.Tensor], torch.Tensor],
            console: Callable[[str], None]) -> dict[str, float]:
        """{val/ tag: mean over the set's readable samples, the same on every rank}, plus val/samples (how
        many were read); one console line. Collective: every rank calls it. `reconstruct` maps a batch to
        the EMA generator's reconstruction."""
        start = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.loader:
            x = batch["x"].to(self.device, non_blocking=True)
            mask = batch["mask"].to(self.device, non_blocking=True)
            figures = self.modality.validation_figures(x, reconstruct(x), self.objective)
            for tag, per_sample in figures.items():
                # padded samples left out by where, not by a product: their figures may be inf
                part = torch.where(mask, per_sample.double(), 0.0).sum()
                sums[tag] = sums[tag] + part if tag in sums else part
            count += mask.sum()
        tags = list(sums)  # the same on every rank: the same modality and batch count
        packed = torch.stack([sums[t] for t in tags] + [count])
        if world_size() > 1:
            dist.all_reduce(packed)
        *totals, samples = packed.tolist()
        figures = {tag: total / samples if samples else float("nan") for tag, total in zip(tags, totals)}
        shown = " ".join(f"{tag[4:]} {value:.4f}" for tag, value in figures.items())
        console(f"validation at step {step}: {shown} over {int(samples)} samples of data.val_shards "
                f"({time.perf_counter() - start:.1f} s)")
        return figures | {"val/samples": samples}
