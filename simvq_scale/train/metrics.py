"""The training figures: what each tag means, how they are collected, reduced once, and written.

Every micro-step adds its loss parts (detached device scalars) and its code indices on the device; no
host sync. At a log step ONE all_reduce carries every figure that needs the other ranks (the loss sums,
the device counters such as skipped samples and non-finite losses, and the code counts of the usage
window, K numbers that stay on the device: only the figures and, at picture steps, about a thousand
points of the sorted counts reach the host); the codebook figures, W's spectrum and the performance
figures are then computed locally (W is the same on every rank) and rank 0 writes them. Other collectives
run only at some log steps, each for a reason of its own: a validation step (train/validation.py: the EMA
generator's forward passes, in which a sharded quantizer communicates, and one all_reduce of the figure
sums), a picture step (the EMA reconstruction of the fixed batch: the same quantizer collectives), and a
log step after samples were skipped (data/skips.py: an all_gather of their names). The tags are defined
here once (TAGS), with the conditions under which a run writes them; the README's monitoring table and
the tests are checked against them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from simvq_scale.config import QUANTIZER_KINDS, Config, to_dict
from simvq_scale.distributed import world_size
from simvq_scale.modality import Modality, modality_names
from simvq_scale.modality.audio import RECON_CLIPS
from simvq_scale.quant.stats import CodebookUsage, usage_figures, weight_spectrum
from simvq_scale.train import render
from simvq_scale.train.logging import NoOpLogger, format_eta

VALIDATION = "validation"  # condition: train.val_every > 0
KNOWN_GPU = "known_gpu"  # condition: a device whose peak FLOP/s the trainer knows (train/flops.py)


@dataclass(frozen=True)
class Tag:
    name: str
    meaning: str
    # written only when all of these hold (run_conditions): a modality, a quantizer kind, VALIDATION, KNOWN_GPU
    only: tuple[str, ...] = ()
    kind: str = "scalar"  # scalar | histogram | image | audio | text

    def applies(self, conditions: frozenset[str]) -> bool:
        return set(self.only) <= conditions


TAGS: tuple[Tag, ...] = (
    Tag("loss/total_g", "the generator's loss"),
    Tag("loss/recon", "L1 between images and reconstructions (in [-1, 1] units)", ("image",)),
    Tag("loss/perceptual", "LPIPS-VGG between images and reconstructions", ("image",)),
    Tag("loss/mel", "L1 between log-mel spectrograms", ("audio",)),
    Tag("loss/feature_matching", "L1 between D's feature maps of real and reconstructed audio", ("audio",)),
    Tag("loss/commit", "the quantizer's loss (commitment and codebook terms)"),
    Tag("loss/g_adv", "the generator's adversarial term (0 before loss.disc_start)"),
    Tag("loss/d", "the discriminator's hinge loss (from loss.disc_start)"),
    Tag("disc/logits_real", "D's mean logit on real samples (from loss.disc_start)"),
    Tag("disc/logits_fake", "D's mean logit on reconstructions (from loss.disc_start)"),
    Tag("val/recon", "validation: L1 of the EMA generator's reconstructions, as loss/recon", ("image", VALIDATION)),
    Tag("val/psnr", "validation: PSNR of the EMA generator's reconstructions on [0, 1] (dB, mean per image)",
        ("image", VALIDATION)),
    Tag("val/mel", "validation: log-mel L1 of the EMA generator's reconstructions, as loss/mel", ("audio", VALIDATION)),
    Tag("val/samples", "validation: samples read (train.val_samples, fewer if the shards hold fewer or some are bad)",
        (VALIDATION,)),
    Tag("codebook/utilization", "fraction of codes used over the last quantizer.usage_window_tokens tokens"),
    Tag("codebook/perplexity", "exp(entropy) of the code frequencies over the window"),
    Tag("codebook/dead_codes", "codes not used over the window"),
    Tag("codebook/entropy_normalized", "entropy of the code frequencies / log K"),
    Tag("codebook/top1pct_share", "share of the window's tokens taken by the most used 1% of codes"),
    Tag("W/rank", "singular values of W above train.rank_rtol * the largest (the paper's Fig. 4)", ("simvq",)),
    Tag("W/rank_fp32", "singular values of W above max * d * eps(fp32): only exact rank loss moves it", ("simvq",)),
    Tag("W/effective_rank", "exp(entropy of the normalized singular values of W)", ("simvq",)),
    Tag("W/fro_norm", "Frobenius norm of W", ("simvq",)),
    Tag("opt/lr_g", "the generator's learning rate"),
    Tag("opt/lr_d", "the discriminator's learning rate"),
    Tag("opt/grad_norm_g", "the generator's gradient norm before clipping"),
    Tag("opt/grad_norm_d", "the discriminator's gradient norm before clipping (0 before loss.disc_start)"),
    Tag("perf/samples_per_s", "training samples per second, all ranks (validation time left out)"),
    Tag("perf/tokens_per_s", "tokens per second, all ranks"),
    Tag("perf/step_ms", "milliseconds per optimizer step over the log interval"),
    Tag("perf/data_wait_frac", "fraction of the interval spent waiting for batches"),
    Tag("perf/max_mem_gib", "peak memory of this rank's device (GiB; CPU: peak resident set)"),
    Tag("perf/model_tflops_per_gpu", "model TFLOP/s per device by the trainer's FLOP count"),
    Tag("perf/mfu", "model TFLOP/s per device / the card's dense bf16 peak", (KNOWN_GPU,)),
    Tag("data/skipped_samples", "bad samples skipped so far, all ranks"),
    Tag("train/nonfinite_losses", "non-finite losses so far, all ranks (train.nan_policy)"),
    Tag("quantizer/search_fallbacks", "tokens the fused search re-scanned in full fp32 so far, all ranks (exactness "
                                      "kept; a growing count costs speed)"),
    Tag("quantizer/per_sample_entropy", "mean per-token code entropy (nats)", ("lfq",)),
    Tag("quantizer/codebook_entropy", "entropy of the batch-averaged code distribution (nats)", ("lfq",)),
    # every train.images_every log steps
    Tag("W/singular_values", "W's singular values as a histogram", ("simvq",), "histogram"),
    Tag("W/spectrum", "W's singular values sorted, on a log axis, with the train.rank_rtol line W/rank counts above",
        ("simvq",), "image"),
    Tag("codebook/rank_frequency", "code counts over the window sorted from the most used, log-log", (), "image"),
    Tag("recon/images", "the fixed batch (first validation images) above the EMA generator's reconstructions",
        ("image",), "image"),
    Tag("recon/mel", "log-mels of the fixed clips, each input above its reconstruction", ("audio",), "image"),
    *(Tag(f"recon/audio_{i}", f"clip {i} of the fixed batch, then 0.25 s of silence, then its reconstruction",
          ("audio",), "audio") for i in range(RECON_CLIPS)),
    # once, at the start
    Tag("config", "the resolved config (YAML)", (), "text"),
)
TAG_NAMES = frozenset(t.name for t in TAGS)
_BY_NAME = {t.name: t for t in TAGS}

# The custom-scalars dashboard: category -> chart -> tags. One tag per chart (several only where a run writes
# one of them): the dashboard colours lines by run, not by tag, so two tags in one chart would look alike,
# and runs compared in one TensorBoard keep a colour each. A run's copy keeps the tags it writes (layout_for).
LAYOUT = {
    "codebook health": {
        "utilization (fraction of codes used)": ["codebook/utilization"], "perplexity": ["codebook/perplexity"],
        "dead codes": ["codebook/dead_codes"], "top-1% share of tokens": ["codebook/top1pct_share"],
        "rank of W (above train.rank_rtol x largest)": ["W/rank"], "effective rank of W": ["W/effective_rank"],
        "strict rank of W (fp32 tolerance)": ["W/rank_fp32"], "norm of W": ["W/fro_norm"],
    },
    "losses": {
        "generator": ["loss/total_g"], "reconstruction (train)": ["loss/recon", "loss/mel"],
        "reconstruction (validation, EMA)": ["val/recon", "val/mel"], "validation PSNR (dB)": ["val/psnr"],
        "perceptual / feature matching": ["loss/perceptual", "loss/feature_matching"],
        "commitment": ["loss/commit"], "adversarial (generator)": ["loss/g_adv"],
        "learning rate (G)": ["opt/lr_g"], "gradient norm (G)": ["opt/grad_norm_g"],
    },
    "discriminator": {
        "loss": ["loss/d"], "logit on real": ["disc/logits_real"], "logit on reconstructions": ["disc/logits_fake"],
        "learning rate (D)": ["opt/lr_d"], "gradient norm (D)": ["opt/grad_norm_d"],
    },
    "performance": {
        "samples per second": ["perf/samples_per_s"], "step time (ms)": ["perf/step_ms"],
        "data wait (fraction)": ["perf/data_wait_frac"], "peak memory (GiB)": ["perf/max_mem_gib"], "MFU": ["perf/mfu"],
    },
}

# The HParams dashboard's metrics (their last values): what compares runs at a glance.
HPARAMS_METRICS = ("codebook/utilization", "codebook/perplexity", "W/rank", "loss/recon", "loss/mel", "val/recon",
                   "val/psnr", "val/mel")


def run_conditions(cfg: Config, peak_flops: float | None) -> frozenset[str]:
    """What decides which tags a run writes (Tag.only)."""
    return frozenset({cfg.data.modality, cfg.quantizer.kind} | ({VALIDATION} if cfg.train.val_every else set())
                     | ({KNOWN_GPU} if peak_flops else set()))


def layout_for(conditions: frozenset[str]) -> dict[str, dict[str, list[str]]]:
    """LAYOUT without the tags this run does not write, and without charts and categories left empty."""
    layout = {}
    for category, charts in LAYOUT.items():
        kept = {title: [t for t in tags if _BY_NAME[t].applies(conditions)] for title, tags in charts.items()}
        if kept := {title: tags for title, tags in kept.items() if tags}:
            layout[category] = kept
    return layout


# Settings of how a run is run and watched, not of what it trains: left out of the HParams dashboard.
OPERATIONAL_SETTINGS = frozenset({
    "train.out_dir", "train.log_every", "train.images_every", "train.ckpt_every", "train.keep_last", "train.compile",
    "train.compile_mode", "train.collective_timeout_s", "train.heartbeat_timeout_s", "data.workers",
    "quantizer.search_chunk", "quantizer.search_impl"})


def hparams_of(cfg: Config) -> dict[str, float | int | str | bool]:
    """The resolved config flattened to dotted scalar keys (lists as text), for the HParams dashboard;
    without the sections of the other quantizer kinds and of the other modality's model, which the run
    does not use, and without OPERATIONAL_SETTINGS (the whole config is in the `config` text)."""
    unused = {f"quantizer.{kind}" for kind in QUANTIZER_KINDS if kind != cfg.quantizer.kind}
    unused |= {f"model.{name}" for name in modality_names() if name != cfg.data.modality} | OPERATIONAL_SETTINGS
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if f"{prefix}{key}" not in unused:
                    walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", to_dict(cfg))
    return flat


class Metrics:
    """Collects a log interval's figures on the device; `log` reduces them once and writes them."""

    def __init__(self, cfg: Config, modality: Modality, logger: NoOpLogger, device: torch.device,
                 codebook_size: int, tokens_per_sample: int, flops_per_sample: float, peak_flops: float | None):
        self.cfg, self.modality, self.logger, self.device = cfg, modality, logger, device
        self.usage = CodebookUsage(codebook_size, cfg.quantizer.usage_window_tokens)
        self.tokens_per_sample, self.flops_per_sample, self.peak_flops = tokens_per_sample, flops_per_sample, peak_flops
        self.conditions = run_conditions(cfg, peak_flops)
        self.log_steps = 0
        self._recent_step_s: deque[float] = deque(maxlen=4)  # the ETA follows the last few intervals
        self._start_interval()

    def _start_interval(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps, self.steps, self.data_wait = 0, 0, 0.0
        self.interval_start = time.perf_counter()

    def write_run_info(self) -> None:
        """At the start of a run: the dashboard layout, the resolved config as text, the hyper-parameters."""
        import yaml

        self.logger.layout(layout_for(self.conditions))
        class ListsOnOneLine(yaml.SafeDumper):  # [8, 8, 8, 5, 5, 5] rather than six lines
            pass

        ListsOnOneLine.add_representer(list, lambda dumper, value: dumper.represent_sequence(
            "tag:yaml.org,2002:seq", value, flow_style=True))
        config = yaml.dump(to_dict(self.cfg), Dumper=ListsOnOneLine, sort_keys=False)
        self.logger.text("config", "```yaml\n" + config + "```")
        self.logger.hparams(hparams_of(self.cfg), [t for t in HPARAMS_METRICS if _BY_NAME[t].applies(self.conditions)])

    def leave_out(self, seconds: float) -> None:
        """Work between steps that is not training (validation) stays out of the interval's throughput."""
        self.interval_start += seconds

    # ---- every micro-step (device only)
    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """One micro-step's loss parts (detached device scalars): averaged over the interval's micro-steps."""
        self.micro_steps += 1
        for tag, value in parts.items():
            self.sums[tag] = self.sums[tag] + value if tag in self.sums else value.detach().clone()

    def add_indices(self, indices: torch.Tensor) -> None:
        self.usage.update(indices)

    def end_step(self, data_wait_s: float) -> None:
        """An optimizer step is done; `data_wait_s` of it was spent waiting for its batch."""
        self.steps += 1
        self.data_wait += data_wait_s

    # ---- every log step (one collective)
    @torch.no_grad()
    def log(self, step: int, counters: dict[str, torch.Tensor], host: dict[str, float],
            w: torch.Tensor | None, images: bool) -> dict[str, float]:
        """Reduce the interval's figures over ranks (collective: every rank calls it), write them on rank 0,
        start a new interval; returns the figures (the same on every rank). `counters` are device scalars
        summed over ranks (e.g. skipped samples); `host` are figures every rank already agrees on (e.g. the
        learning rates); `w` is the quantizer's linear map, if any."""
        tags = sorted(self.sums)
        counter_tags = sorted(counters)
        packed = torch.cat([
            torch.stack([self.sums[t].double() / max(1, self.micro_steps) for t in tags]
                        + [counters[t].double().reshape(()) for t in counter_tags]).to(self.device)
            if tags or counter_tags else torch.zeros(0, dtype=torch.double, device=self.device),
            self.usage.counts.double().to(self.device),
        ])
        if world_size() > 1:
            dist.all_reduce(packed)
        world = world_size()
        n_means = len(tags)
        values = dict(zip(tags, (packed[:n_means] / world).tolist()))
        values.update(zip(counter_tags, packed[n_means:n_means + len(counter_tags)].tolist()))
        counts = packed[n_means + len(counter_tags):]
        usage = usage_figures(counts)
        values.update({f"codebook/{k}": v for k, v in usage.items()})
        values.update(host)
        values.update(self._performance())
        spectrum = None
        if w is not None:
            spectrum = weight_spectrum(w, self.cfg.train.rank_rtol)
            values.update({"W/rank": float(spectrum["rank"]), "W/rank_fp32": float(spectrum["rank_fp32"]),
                           "W/effective_rank": spectrum["effective_rank"], "W/fro_norm": spectrum["frobenius_norm"]})
        self.logger.scalars(step, values)
        if images:
            self._log_distributions(step, counts, spectrum, counts.numel() - int(values["codebook/dead_codes"]))
        self._console(step, values)
        self.log_steps += 1
        self._start_interval()
        return values

    def _performance(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
        steps = max(1, self.steps)
        samples = steps * self.cfg.train.global_batch
        self._recent_step_s.append(elapsed / steps)
        tflops = samples * self.flops_per_sample / elapsed / world_size() / 1e12
        figures = {
            "perf/samples_per_s": samples / elapsed,
            "perf/tokens_per_s": samples * self.tokens_per_sample / elapsed,
            "perf/step_ms": 1000 * elapsed / steps,
            "perf/data_wait_frac": min(1.0, self.data_wait / elapsed),
            "perf/max_mem_gib": max_memory_gib(self.device),
            "perf/model_tflops_per_gpu": tflops,
        }
        if self.peak_flops:
            figures["perf/mfu"] = tflops * 1e12 / self.peak_flops
        return figures

    def _log_distributions(self, step: int, counts: torch.Tensor, spectrum: dict | None, used: int) -> None:
        """The sorted per-code counts (log-log) and W's sorted spectrum (log scale), as pictures."""
        ranks, frequency = render.rank_frequency(counts)
        size = counts.numel()
        self.logger.image(step, "codebook/rank_frequency", render.log_plot(
            frequency, ranks, "code counts over the usage window, most used first", "rank of the code",
            x_log=True, counts=True, marks=(render.Mark("x", max(used, 1), f"{used:,} of {size:,} used"),)))
        if spectrum is not None:
            s = spectrum["singular_values"]
            rtol = self.cfg.train.rank_rtol
            self.logger.histogram(step, "W/singular_values", s)
            self.logger.image(step, "W/spectrum", render.log_plot(
                s, torch.arange(1, s.numel() + 1), "singular values of W, largest first", "index",
                marks=(render.Mark("y", rtol * float(s.max()), f"rank_rtol {rtol:g}: W/rank {spectrum['rank']}"),)))

    def eta_s(self, step: int) -> float:
        recent = sum(self._recent_step_s) / max(1, len(self._recent_step_s))
        return recent * (self.cfg.train.steps - step) if self._recent_step_s else float("nan")

    def _console(self, step: int, values: dict[str, float]) -> None:
        recon = self.modality.recon_loss_tag
        unit = self.modality.samples_per_unit(self.cfg.data)
        self.logger.console(
            f"step {step}/{self.cfg.train.steps} "
            f"g {values.get('loss/total_g', math.nan):.4f} {recon[5:]} {values.get(recon, math.nan):.4f} "
            f"d {values.get('loss/d', 0.0):.4f} util {values['codebook/utilization']:.4f} "
            f"ppl {values['codebook/perplexity']:.1f} "
            f"| {values['perf/samples_per_s'] * unit:.1f} {self.modality.sample_noun}/s "
            f"{values['perf/step_ms']:.0f} ms/step data-wait {values['perf/data_wait_frac']:.0%} "
            f"| eta {format_eta(self.eta_s(step))}")


def max_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
