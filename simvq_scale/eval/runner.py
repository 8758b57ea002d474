"""Evaluate a tokenizer over an evaluation shard set, on one process or many, with globally reduced figures.

Every sample of the shard set (or of its first `max_samples`, in shard order) is read by exactly one
rank (simvq_scale.data.build_eval_loader splits them in contiguous ranges; padding is masked out).
Per-sample metrics are kept as sums and counts and all-reduced; codebook counts are all-reduced by
CodebookUsage; rFID sums are reduced by torchmetrics. All reductions are collectives that every rank
runs, so `evaluate` must be called on every rank; the returned report is the same on every rank.

Which metrics are computed is the modality's answer: `get_modality(name).evaluator_class()` (eval/image.py,
eval/audio.py; eval/evaluator.py says what an evaluator is). A metric whose network or package is missing
is reported as unavailable with the reason, never computed with random weights. A path given explicitly
that does not exist is an error naming the option.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from simvq_scale import distributed
from simvq_scale.config import DataConfig
from simvq_scale.data import ShardLoader, build_eval_loader
from simvq_scale.eval.evaluator import CODEBOOK_METRICS, CODEBOOK_NOTES, Evaluator, MetricNetworks
from simvq_scale.inference import Tokenizer
from simvq_scale.modality import get_modality
from simvq_scale.quant.stats import CodebookUsage

# Evaluation counts every token of the set: the usage window never drops a step.
WHOLE_SET_WINDOW = 2**62


def metric_notes(evaluator: type[Evaluator]) -> dict[str, str]:
    """How each figure of a report made with `evaluator` is computed (before the instance's own notes)."""
    return {**CODEBOOK_NOTES, **evaluator.NOTES}


def limited_eval_loader(data: DataConfig, shards: str, batch_size: int, rank: int, world_size: int,
                        max_samples: int | None = None) -> ShardLoader:
    """build_eval_loader over the first `max_samples` samples of `shards` in shard order (all when None),
    so that the evaluated set does not depend on the number of ranks."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples={max_samples} must be >= 1")
    return build_eval_loader(data, shards, batch_size, rank, world_size, max_samples)


def _valid(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    mask = batch["mask"]
    keys = [k for k, m in zip(batch["key"], mask.tolist()) if m]
    return batch["x"][mask].to(device, non_blocking=True), keys


def encoded_batches(tokenizer: Tokenizer, loader: ShardLoader, progress: bool = True,
                    desc: str = "encode") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, inputs, code ids) of the real (unmasked) samples of each batch; a progress bar on rank 0.

    Padded batches are still run through the model when a rank has no real sample left, because a
    quantizer may be collective and every rank must call it equally often."""
    quiet = not progress or not distributed.is_main()
    for batch in tqdm(loader, total=len(loader), desc=desc, disable=quiet, unit="batch"):
        x, keys = _valid(batch, tokenizer.device)
        ids = tokenizer.encode(x) if keys else tokenizer.encode(batch["x"][:1].to(tokenizer.device))[:0]
        yield keys, x, ids


def skipped_counts(loader: ShardLoader) -> dict[str, int]:
    """Bad samples counted by the loader, summed over ranks."""
    return dict(sum((Counter(c) for c in distributed.gather_objects(loader.skipped())), Counter()))


def global_code_counts(usage: CodebookUsage) -> torch.Tensor:
    """(K,) how often each code was chosen over the whole set, all ranks summed."""
    return distributed.all_reduce_sum(usage.counts.clone()).cpu()


def evaluate(tokenizer: Tokenizer, loader: ShardLoader, networks: MetricNetworks | None = None,
             progress: bool = True) -> dict:
    """Reconstruct every sample of `loader`; the report (same on every rank) holds figures and reasons."""
    networks = networks or MetricNetworks()
    device = tokenizer.device
    evaluator_class = get_modality(tokenizer.modality).evaluator_class()
    evaluator = evaluator_class(device, networks, tokenizer.config.data)
    usage = CodebookUsage(tokenizer.codebook_size, WHOLE_SET_WINDOW)
    quiet = not progress or not distributed.is_main()
    samples = 0
    for batch in tqdm(loader, total=len(loader), desc="eval", disable=quiet, unit="batch"):
        x, keys = _valid(batch, device)
        if not keys:  # a padding-only batch: keep the forward count equal on every rank
            tokenizer.reconstruct(batch["x"][:1].to(device))
            continue
        samples += len(keys)
        x_hat, ids = tokenizer.reconstruct(x)
        usage.update(ids)
        evaluator.update(x, x_hat)
    figures = evaluator.compute()
    codebook = usage.reduce()
    figures = {"utilization": codebook["utilization"], "perplexity": codebook["perplexity"], **figures}
    samples = int(distributed.all_reduce_sum(torch.tensor([samples], dtype=torch.long, device=device)).item())
    return {
        "checkpoint": tokenizer.source, "step": tokenizer.step, "modality": tokenizer.modality,
        "codebook_size": tokenizer.codebook_size, "world_size": distributed.world_size(), "samples": samples,
        "tokens": int(codebook["window_tokens"]),
        "metrics": figures,
        "codebook": {k: v for k, v in codebook.items() if k != "window_tokens"},
        "unavailable": dict(evaluator.unavailable),
        "conventions": dict(evaluator.conventions),
        "skipped_samples": skipped_counts(loader),
        "notes": {**metric_notes(evaluator_class), **evaluator.notes},
    }


def markdown_table(report: dict) -> str:
    """The report's figures as a Markdown table (how each is computed beside it; unavailable metrics with their
    reason), then the report's other notes."""
    lines = [f"Evaluation of `{report['checkpoint']}` (step {report['step']}, {report['modality']}, "
             f"K={report['codebook_size']}, {report['samples']} samples, {report['tokens']} tokens, "
             f"{report['world_size']} process(es))", "", "| metric | value | how |", "|---|---|---|"]
    order = (*CODEBOOK_METRICS, *get_modality(report["modality"]).evaluator_class().METRICS)
    for name in order:
        if name in report["metrics"]:
            value = report["metrics"][name]
            text = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        else:
            text = report["unavailable"].get(name, "unavailable")
        lines.append(f"| {name} | {_cell(text)} | {_cell(report['notes'].get(name, ''))} |")
    other_notes = [f"- {name}: {note}" for name, note in report["notes"].items() if name not in order]
    if other_notes:
        lines += ["", *other_notes]
    if report["skipped_samples"]:
        lines += ["", f"Skipped samples: {report['skipped_samples']}"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | inside a cell (|log mel|) would split it


def start_tool(checkpoint: str, device: str = "") -> Tokenizer:
    """For the tools: join the process group (torchrun, deepspeed or plain python) and load the tokenizer
    onto this rank's device (or `device`)."""
    from simvq_scale.inference import load_tokenizer

    rank_device = distributed.init_distributed(use_deepspeed=False)
    return load_tokenizer(checkpoint, device or rank_device)


def add_common_arguments(parser, data_required: bool = True) -> None:
    """--checkpoint, --data, --max-samples, --batch-size, --workers, --device (and the launcher's --local_rank)."""
    import argparse

    parser.add_argument("--checkpoint", required=True, help="training out_dir (its generator_ema.pt) or an export file")
    parser.add_argument("--data", required=data_required,
                        help="evaluation shards: brace pattern, glob, or several joined by '::' (quote it)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="only the first N samples of the shard set, in shard order (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch and rank (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers per rank (default 2)")
    parser.add_argument("--device", default="", help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def tool_loader(tokenizer: Tokenizer, args) -> ShardLoader:
    import dataclasses

    data = dataclasses.replace(tokenizer.config.data, workers=args.workers)
    return limited_eval_loader(data, args.data, args.batch_size, distributed.rank(), distributed.world_size(),
                               args.max_samples)


def finish_tool() -> None:
    """Wait for every rank, then leave the process group cleanly (a group left to interpreter teardown
    can abort a rank that exits while another is still writing)."""
    if distributed.initialized():
        dist.barrier()
        dist.destroy_process_group()
