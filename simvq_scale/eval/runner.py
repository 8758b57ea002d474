"""Evaluate a tokenizer over an evaluation shard set, on one process or many, with globally reduced figures.

Every sample of the shard set (or of its first `max_samples`, in shard order) is read by exactly one
rank (simvq_scale.data.build_eval_loader splits them in contiguous ranges; padding is masked out).
Per-sample metrics are kept as sums and counts and all-reduced; codebook counts are all-reduced by
CodebookUsage; rFID sums are reduced by torchmetrics. All reductions are collectives that every rank
runs, so `evaluate` must be called on every rank; the returned report is the same on every rank.

A metric whose network or package is missing is reported as unavailable with the reason, never
computed with random weights. A path given explicitly that does not exist is an error naming the option.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from simvq_scale.config import DataConfig
from simvq_scale.data import ShardLoader, build_eval_loader
from simvq_scale.eval import audio as audio_metrics
from simvq_scale.eval import image as image_metrics
from simvq_scale.inference import Tokenizer
from simvq_scale.pretrained import FETCH_COMMAND
from simvq_scale.quant.stats import CodebookUsage

# Evaluation counts every token of the set: the usage window never drops a step.
WHOLE_SET_WINDOW = 2**62
IMAGE_METRICS = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "rfid")
AUDIO_METRICS = ("pesq_wb", "stoi", "mel_distance", "vuv_f1", "utmos")
SKIPPABLE = IMAGE_METRICS[2:] + AUDIO_METRICS
# per-clip audio metrics that have no figure for some clips, and why (counted and noted in the report)
LEFT_OUT = {"pesq_wb": "without detectable speech",
            "vuv_f1": "with no frame voiced in both the original and the reconstruction (as the reference does)"}


@dataclass
class MetricNetworks:
    """Local files of the metric networks ("" = the default file in simvq_scale.pretrained.weights_dir())."""

    lpips_vgg: str = ""
    lpips_alex: str = ""
    fid_inception: str = ""
    utmos_weights: str = ""  # no default: UTMOS runs only when given
    skip: tuple[str, ...] = field(default_factory=tuple)  # metric names not to compute
    ssim_convention: str = "paper"  # a key of image_metrics.SSIM_CONVENTIONS

    def __post_init__(self):
        unknown = sorted(set(self.skip) - set(SKIPPABLE))
        if unknown:
            raise ValueError(f"--skip {','.join(unknown)}: not a skippable metric; choose from {', '.join(SKIPPABLE)}")
        if self.ssim_convention not in image_metrics.SSIM_CONVENTIONS:
            raise ValueError(f"--ssim-convention {self.ssim_convention}: choose from "
                             f"{', '.join(image_metrics.SSIM_CONVENTIONS)}")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


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


class ImageEvaluator:
    def __init__(self, device: torch.device, networks: MetricNetworks):
        self.unavailable: dict[str, str] = {}
        self.ssim_convention = networks.ssim_convention
        self.conventions = {"ssim": self.ssim_convention}
        self.notes = {"ssim": f"mean per image; {self.ssim_convention} convention: "
                              f"{image_metrics.SSIM_CONVENTIONS[self.ssim_convention]}"}
        self.lpips = {}
        for net, metric, option, path in (("vgg", "lpips_vgg", "--lpips-vgg", networks.lpips_vgg),
                                           ("alex", "lpips_alex", "--lpips-alex", networks.lpips_alex)):
            model = optional_network(metric, option, path, lambda p, net=net: image_metrics.Lpips(net, p),
                                     networks, self.unavailable)
            if model is not None:
                self.lpips[metric] = model.to(device)
        fid = optional_network("rfid", "--fid-inception", networks.fid_inception, image_metrics.reconstruction_fid,
                               networks, self.unavailable)
        self.fid = None if fid is None else fid.to(device)
        self.means = MeanSums(("psnr", "ssim", "lpips_vgg", "lpips_alex"), device)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x_hat = x_hat.clamp(-1, 1)
        self.means.add("psnr", image_metrics.psnr_per_image(x, x_hat))
        self.means.add("ssim", image_metrics.ssim_per_image(x, x_hat, self.ssim_convention))
        for metric, model in self.lpips.items():
            self.means.add(metric, model(x, x_hat))
        if self.fid is not None:
            self.fid.update(x, real=True)
            self.fid.update(x_hat, real=False)

    def compute(self) -> dict[str, float | None]:
        means = self.means.reduce()
        figures = {name: mean for name, (mean, _) in means.items() if name not in self.unavailable}
        if self.fid is not None:
            samples = means["psnr"][1]  # every image went into both feature sets
            if samples < 2:
                self.unavailable["rfid"] = f"unavailable (needs >= 2 images, the set has {samples})"
            else:
                figures["rfid"] = float(self.fid.compute())  # collective: torchmetrics sums the states over ranks
        return figures


class AudioEvaluator:
    def __init__(self, device: torch.device, networks: MetricNetworks, rate: int):
        self.rate = rate
        self.unavailable: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.conventions: dict[str, str] = {}
        for metric, package in (("pesq_wb", "pesq"), ("stoi", "pystoi"), ("vuv_f1", "torchcrepe")):
            reason = "skipped (--skip)" if metric in networks.skip else audio_metrics.missing_package(package)
            if reason:
                self.unavailable[metric] = reason
        if not networks.utmos_weights and "utmos" not in networks.skip:
            self.unavailable["utmos"] = "unavailable (no --utmos-weights)"
        self.utmos = (optional_network("utmos", "--utmos-weights", networks.utmos_weights, audio_metrics.load_utmos,
                                       networks, self.unavailable) if networks.utmos_weights else None)
        if self.utmos is not None:
            self.utmos.to(device)
        if "mel_distance" in networks.skip:
            self.unavailable["mel_distance"] = "skipped (--skip)"
        self.mel = audio_metrics.MelDistance(rate).to(device)
        self.means = MeanSums(("pesq_wb", "stoi", "mel_distance", "vuv_f1", "utmos"), device)
        self.left_out = torch.zeros(len(LEFT_OUT), dtype=torch.float64, device=device)  # clips without a figure

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x_hat = x_hat.clamp(-1, 1)
        for metric, per_clip in (("pesq_wb", audio_metrics.pesq_wb), ("vuv_f1", audio_metrics.vuv_f1)):
            if metric not in self.unavailable:
                scores = per_clip(x, x_hat, self.rate)
                self.means.add(metric, scores)
                self.left_out[list(LEFT_OUT).index(metric)] += sum(s is None for s in scores)
        if "stoi" not in self.unavailable:
            self.means.add("stoi", audio_metrics.stoi(x, x_hat, self.rate))
        if "mel_distance" not in self.unavailable:
            self.means.add("mel_distance", self.mel(x, x_hat))
        if self.utmos is not None:
            self.means.add("utmos", audio_metrics.utmos_scores(self.utmos, x_hat, self.rate))

    def compute(self) -> dict[str, float | None]:
        means = self.means.reduce()
        figures = {name: mean for name, (mean, _) in means.items() if name not in self.unavailable}
        left_out = all_reduce_sum(self.left_out.clone()).tolist()
        for (metric, why), n in zip(LEFT_OUT.items(), left_out):
            if n:
                self.notes[f"{metric}_left_out"] = f"{int(n)} of {int(n) + means[metric][1]} clips {why} left out"
        return figures


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


def _match_length(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms (B, T) and a decoder output (B, [1,] T'), cut to the common length."""
    x_hat = x_hat.reshape(x_hat.shape[0], -1)
    n = min(x.shape[-1], x_hat.shape[-1])
    return x[:, :n], x_hat[:, :n]


def encoded_batches(tokenizer: Tokenizer, loader: ShardLoader, progress: bool = True,
                    desc: str = "encode") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, inputs, code ids) of the real (unmasked) samples of each batch; a progress bar on rank 0.

    Padded batches are still run through the model when a rank has no real sample left, because a
    quantizer may be collective and every rank must call it equally often."""
    rank, _ = rank_and_world()
    for batch in tqdm(loader, total=len(loader), desc=desc, disable=not progress or rank != 0, unit="batch"):
        x, keys = _valid(batch, tokenizer.device)
        ids = tokenizer.encode(x) if keys else tokenizer.encode(batch["x"][:1].to(tokenizer.device))[:0]
        yield keys, x, ids


def skipped_counts(loader: ShardLoader) -> dict[str, int]:
    """Bad samples counted by the loader, summed over ranks."""
    counts = Counter(loader.skipped())
    if rank_and_world()[1] > 1:
        gathered: list = [None] * rank_and_world()[1]
        dist.all_gather_object(gathered, dict(counts))
        counts = sum((Counter(c) for c in gathered), Counter())
    return dict(counts)


def global_code_counts(usage: CodebookUsage) -> torch.Tensor:
    """(K,) how often each code was chosen over the whole set, all ranks summed."""
    return all_reduce_sum(usage.counts.clone()).cpu()


def evaluate(tokenizer: Tokenizer, loader: ShardLoader, networks: MetricNetworks | None = None,
             progress: bool = True) -> dict:
    """Reconstruct every sample of `loader`; the report (same on every rank) holds figures and reasons."""
    networks = networks or MetricNetworks()
    device = tokenizer.device
    modality = tokenizer.modality
    if modality == "image":
        evaluator = ImageEvaluator(device, networks)
    else:
        evaluator = AudioEvaluator(device, networks, tokenizer.sample_rate)
    usage = CodebookUsage(tokenizer.codebook_size, WHOLE_SET_WINDOW)
    rank, world = rank_and_world()
    samples = 0
    for batch in tqdm(loader, total=len(loader), desc="eval", disable=not progress or rank != 0, unit="batch"):
        x, keys = _valid(batch, device)
        if not keys:  # a padding-only batch: keep the forward count equal on every rank
            tokenizer.reconstruct(batch["x"][:1].to(device))
            continue
        samples += len(keys)
        x_hat, ids = tokenizer.reconstruct(x)
        usage.update(ids)
        if modality == "audio":
            x, x_hat = _match_length(x, x_hat)
        evaluator.update(x, x_hat.float())
    figures = evaluator.compute()
    codebook = usage.reduce()
    figures = {"utilization": codebook["utilization"], "perplexity": codebook["perplexity"], **figures}
    samples = int(all_reduce_sum(torch.tensor([samples], dtype=torch.long, device=device)).item())
    return {
        "checkpoint": tokenizer.source, "step": tokenizer.step, "modality": modality,
        "codebook_size": tokenizer.codebook_size, "world_size": world, "samples": samples,
        "tokens": int(codebook["window_tokens"]),
        "metrics": figures,
        "codebook": {k: v for k, v in codebook.items() if k != "window_tokens"},
        "unavailable": dict(evaluator.unavailable),
        "conventions": dict(evaluator.conventions),
        "skipped_samples": skipped_counts(loader),
        "notes": {**METRIC_NOTES[modality], **evaluator.notes},
    }


METRIC_NOTES = {
    "image": {
        "utilization": "fraction of the K codes chosen at least once over the evaluation set (the paper's definition)",
        "perplexity": "exp(entropy) of the code frequencies over the evaluation set",
        "psnr": "mean of per-image PSNR on [0,1] (data range 1); the reference code pools the MSE over a batch",
        # "ssim": set by ImageEvaluator, naming the convention used
        "lpips_vgg": "LPIPS v0.1, VGG16 trunk, mean per image",
        "lpips_alex": "LPIPS v0.1, AlexNet trunk, mean per image",
        "rfid": f"Frechet distance (torchmetrics), reconstructions vs originals, of {image_metrics.RFID_INPUT}",
    },
    "audio": {
        "utilization": "fraction of the K codes chosen at least once over the evaluation set (the paper's definition)",
        "perplexity": "exp(entropy) of the code frequencies over the evaluation set",
        "pesq_wb": "PESQ wide-band (P.862.2) at 16 kHz, mean per clip",
        "stoi": "STOI (pystoi), mean per clip",
        "mel_distance": audio_metrics.MEL_DISTANCE_NOTE,
        "vuv_f1": audio_metrics.VUV_F1_NOTE,
        "utmos": "UTMOS from the TorchScript file given by --utmos-weights, mean per clip",
    },
}


def markdown_table(report: dict) -> str:
    """The report's figures as a Markdown table (how each is computed beside it; unavailable metrics with their
    reason), then the report's other notes."""
    lines = [f"Evaluation of `{report['checkpoint']}` (step {report['step']}, {report['modality']}, "
             f"K={report['codebook_size']}, {report['samples']} samples, {report['tokens']} tokens, "
             f"{report['world_size']} process(es))", "", "| metric | value | how |", "|---|---|---|"]
    order = ("utilization", "perplexity", *(IMAGE_METRICS if report["modality"] == "image" else AUDIO_METRICS))
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
    from simvq_scale.distributed import init_distributed
    from simvq_scale.inference import load_tokenizer

    rank_device = init_distributed(use_deepspeed=False)
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

    rank, world = rank_and_world()
    data = dataclasses.replace(tokenizer.config.data, workers=args.workers)
    return limited_eval_loader(data, args.data, args.batch_size, rank, world, args.max_samples)


def finish_tool() -> None:
    """Wait for every rank, then leave the process group cleanly (a group left to interpreter teardown
    can abort a rank that exits while another is still writing)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
