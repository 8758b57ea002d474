"""The Trainer: two DeepSpeed engines (generator, discriminator), the GAN step, the loop.

One step, per micro-batch:
  1. D frozen (requires_grad False); x_hat, q = G(x); G loss (recon/perceptual/commit
     + adversarial through frozen D); one backward and step of the G engine.
  2. D unfrozen; hinge loss on (x, sg(x_hat)); one backward and step of the D engine
     (from loss.disc_start on; before it the D engine is left alone on every rank).
After each optimizer step the EMA generator follows G. Figures are summed on the
device and reduced across ranks only at log steps (one collective, one host sync).

Mixed precision is torch.autocast(bf16) around the forward passes with DeepSpeed in
fp32: DeepSpeed's own bf16 mode casts every buffer to bf16, and the frozen codebook
must stay fp32 for an exact search.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from simvq_scale import distributed as D
from simvq_scale.config import Config, dump_config, micro_batch_and_accumulation, to_dict
from simvq_scale.data import build_eval_loader, build_train_loader
from simvq_scale.inference import export_generator
from simvq_scale.losses import build_objective
from simvq_scale.models import build_generator
from simvq_scale.models.discriminators import build_discriminator
from simvq_scale.quant.factory import build_quantizer
from simvq_scale.quant.stats import CodebookUsage, weight_spectrum
from simvq_scale.train.checkpoint import Checkpointer
from simvq_scale.train.logging import NoOpLogger, RunLogger, format_eta
from simvq_scale.train.run_dir import RunDir

EXPORT_NAME = "generator_ema.pt"


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """Shape of one training sample (without the batch dimension)."""
    if cfg.data.modality == "image":
        return (cfg.model.image.in_channels, cfg.data.image_size, cfg.data.image_size)
    return (round(cfg.data.segment_seconds * cfg.data.sample_rate),)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def lr_lambda(cfg: Config):
    """Linear warm-up, then constant or cosine down to min_lr_ratio; a factor of the base lr."""
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


class Trainer:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.world, self.rank = D.world_size(), D.rank()
        self.micro_batch, self.accumulation = micro_batch_and_accumulation(
            cfg.train.global_batch, cfg.train.micro_batch, self.world)
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.quantizer = build_quantizer(cfg.quantizer)
        self.generator = build_generator(cfg, self.quantizer).to(device)
        self.discriminator = build_discriminator(cfg).to(device)
        self.tokens_per_sample, self.flops_per_sample = self._measure_shapes()
        self.checkpointer = Checkpointer(Path(cfg.train.out_dir), cfg.train.keep_last)

    @torch.no_grad()
    def _measure_shapes(self) -> tuple[int, float]:
        """(tokens per sample, model FLOPs per training sample), on the meta device: no compute, no collectives.

        A training sample costs forward + backward (3x forward) of encoder, decoder and D inside
        the G step, and of D twice (real, fake) in the D step. The search and LPIPS are not counted.
        """
        from torch.utils.flop_counter import FlopCounterMode

        encoder, decoder, disc = (copy.deepcopy(m).to("meta") for m in
                                  (self.generator.encoder, self.generator.decoder, self.discriminator))
        x = torch.empty(1, *sample_shape(self.cfg), device="meta")
        with FlopCounterMode(display=False) as generator_flops:
            x_hat = decoder(encoder(x))
        with FlopCounterMode(display=False) as disc_flops:
            disc(x_hat)
        tokens = math.prod(encoder(x).shape[2:])
        return tokens, 3.0 * generator_flops.get_total_flops() + 9.0 * disc_flops.get_total_flops()

    def describe(self) -> dict:
        """The `--dry-run` summary."""
        return {
            "parameters_generator": count_parameters(self.generator),
            "parameters_discriminator": count_parameters(self.discriminator),
            "codebook_size": self.quantizer.codebook_size,
            "tokens_per_sample": self.tokens_per_sample,
            "model_gflops_per_sample": round(self.flops_per_sample / 1e9, 3),
            "global_batch": self.cfg.train.global_batch,
            "micro_batch": self.micro_batch,
            "gradient_accumulation": self.accumulation,
            "world_size": self.world,
            "precision": "bf16" if self.bf16 else "fp32",
            "device": self.device.type,
        } | self._bitrate()

    def _bitrate(self) -> dict:
        """Audio: bits per second of the token stream, tokens/s * log2(codebook size)."""
        if self.cfg.data.modality != "audio":
            return {}
        tokens_per_second = self.tokens_per_sample / self.cfg.data.segment_seconds
        return {"tokens_per_second": tokens_per_second,
                "bitrate_bps": tokens_per_second * math.log2(self.quantizer.codebook_size)}

    # ------------------------------------------------------------------ set-up

    def _engine(self, model: nn.Module, lr: float, zero_stage: int):
        import deepspeed

        o = self.cfg.optim
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      betas=tuple(o.betas), weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))
        ds_config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation,
            "train_batch_size": self.cfg.train.global_batch,
            "gradient_clipping": o.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # the client AdamW: no FusedAdam compile
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        ds_config.update(self.checkpointer.deepspeed_config(zero_stage))  # a resume at another world size
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        return engine

    def _setup(self, resuming: bool = False) -> None:
        """Build everything; `resuming`: a checkpoint will overwrite the weights, so skip the data-dependent start."""
        cfg = self.cfg
        out = Path(cfg.train.out_dir)
        if D.is_main():
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / "config.yaml")
        dist.barrier()
        if cfg.quantizer.init_from_data and not resuming:
            self._init_quantizer_from_data()
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.ema_buffers = _share_frozen_buffers(self.ema, self.generator)
        self.objective = build_objective(cfg).to(self.device)
        self.engine_g = self._engine(self.generator, cfg.optim.lr, cfg.optim.zero_stage_g)
        self.engine_d = self._engine(self.discriminator, cfg.optim.disc_lr or cfg.optim.lr, cfg.optim.zero_stage_d)
        self.usage = CodebookUsage(self.quantizer.codebook_size, cfg.quantizer.usage_window_tokens)
        self.logger = RunLogger(out) if D.is_main() else NoOpLogger()
        # the non-finite guard: under nan_policy=skip a step whose loss is not finite contributes zero
        # gradients (decided on the device, no host sync); its count is read at log steps
        self.finite_g = torch.ones((), dtype=torch.bool, device=self.device)
        self.finite_d = torch.ones((), dtype=torch.bool, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        if cfg.train.nan_policy == "skip":
            _guard_gradients(self.generator, self.finite_g)
            _guard_gradients(self.discriminator, self.finite_d)
        self.step, self.samples_seen = 0, 0
        self.stream_start = 0  # step at which the current data stream was seeded (its resume counter)

    @torch.no_grad()
    def _init_quantizer_from_data(self) -> None:
        """quantizer.init_from_data: W and b from the encoder's tokens on one batch per rank (all ranks'
        statistics), before the engines exist (ZeRO keeps its own master copy of the weights after)."""
        init = getattr(self.quantizer, "init_from_tokens", None)
        if init is None:
            raise ValueError(f"quantizer.init_from_data is set but quantizer.kind={self.cfg.quantizer.kind!r} "
                             "has no data-dependent start (SimVQ has)")
        batch = next(iter(build_train_loader(self.cfg.data, self.micro_batch, self.rank, self.world)))
        with self._autocast():
            z = self.generator.encoder(batch["x"].to(self.device))
        tokens = z.float().movedim(1, -1).reshape(-1, z.shape[1])
        moments = torch.cat([tokens.sum(0), tokens.pow(2).sum(0), tokens.new_tensor([tokens.shape[0]])])
        dist.all_reduce(moments)
        dim = tokens.shape[1]
        count = moments[-1]
        mean = moments[:dim] / count
        std = (moments[dim : 2 * dim] / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        init(mean, std)

    # ------------------------------------------------------------------ state

    def _client_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "stream_start": self.stream_start,
                "world_size": self.world, "ema": self.ema.state_dict(), "config": to_dict(self.cfg)}

    def _restore(self, found: tuple[Path, str]) -> None:
        root, tag = found
        client, rank_state = self.checkpointer.load(root, tag, self.engine_g, self.engine_d)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.stream_start = client["stream_start"]
        self.ema.load_state_dict(client["ema"])
        if rank_state is not None:  # re-split by the checkpointer when the world size changed
            self.usage.load_state_dict(rank_state["usage"])
        self.logger.console(f"resumed from {root}/*/{tag} at step {self.step} ({self.samples_seen} samples seen)")

    def _save(self) -> None:
        self._check_finite()
        # the data stream restarts from a seed made of this step (below), so a resumed run reads
        # exactly what an uninterrupted one reads after this checkpoint
        self.stream_start = self.step
        self.checkpointer.save(self.step, self.engine_g, self.engine_d, self._client_state(),
                               {"usage": self.usage.state_dict()})
        if D.is_main():
            self.export(Path(self.cfg.train.out_dir) / EXPORT_NAME)
        self._start_stream(self.stream_start)

    def export(self, path: Path) -> None:
        """The EMA generator in one file, loadable without DeepSpeed (simvq_scale.inference)."""
        export_generator(self.ema, self.cfg, self.step, path)

    def _start_stream(self, start_step: int) -> None:
        self.stream_start = start_step
        loader = build_train_loader(self.cfg.data, self.micro_batch, self.rank, self.world,
                                    resume_counter=start_step)
        self.loader = loader
        self.batches = iter(loader)

    # ------------------------------------------------------------------ the step

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _micro_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        adversarial = self.step >= self.cfg.loss.disc_start
        x_hat, parts = self._generator_step(x, adversarial)
        if adversarial:
            parts.update(self._discriminator_step(x, x_hat))
        return parts

    def _generator_step(self, x: torch.Tensor, adversarial: bool = True):
        """One forward/backward/step of the G engine with D frozen; returns (sg(x_hat), loss parts)."""
        disc = self.engine_d.module
        disc.requires_grad_(False)
        try:
            with self._autocast():
                x_hat, quant = self.engine_g(x)
                loss_g, parts = self.objective.generator_loss(
                    x, x_hat, quant, disc if adversarial else None, self.engine_g.module.last_layer)
            self.finite_g.copy_(torch.isfinite(loss_g))
            self.engine_g.backward(loss_g)
            self.engine_g.step()
        finally:
            disc.requires_grad_(True)
        self.nonfinite += (~self.finite_g).long()
        self.usage.update(quant.indices)
        return x_hat.detach(), parts

    def _discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward/backward/step of the D engine on (x, sg(x_hat))."""
        with self._autocast():
            loss_d, parts = self.objective.discriminator_loss(self.engine_d, x, x_hat)
        self.finite_d.copy_(torch.isfinite(loss_d))
        self.engine_d.backward(loss_d)
        self.engine_d.step()
        self.nonfinite += (~self.finite_d).long()
        return parts

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.model.ema_decay
        ema_params = [p for p in self.ema.parameters()]
        params = [p.detach() for p in self.engine_g.module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in self.ema_buffers:
            ema_buffer.copy_(buffer)

    def _check_finite(self) -> int:
        """Collective: the number of non-finite losses on any rank since the start; stops under nan_policy=stop."""
        count = self.nonfinite.clone()
        dist.all_reduce(count)
        count = int(count)
        if count and self.cfg.train.nan_policy == "stop":
            raise FloatingPointError(
                f"{count} non-finite loss(es) before step {self.step} and train.nan_policy=stop: stopping without "
                f"a checkpoint; `--resume auto` restarts from the last good one")
        return count

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: str | None = None, overwrite: bool = False) -> None:
        # lock the run folder, check --resume/--overwrite and the config against the checkpoint, tidy
        self.run_dir = RunDir(self.cfg, self.checkpointer)
        found = self.run_dir.open(resume, overwrite, {"generator": self.generator,
                                                      "discriminator": self.discriminator})
        self._setup(resuming=found is not None)
        if found is not None:
            self._restore(found)
        self._start_stream(self.stream_start)
        self.engine_g.train()
        self.engine_d.train()
        sums: dict[str, torch.Tensor] = {}
        micro_steps, data_wait, interval_start = 0, 0.0, time.perf_counter()
        run_start, first_step = time.perf_counter(), self.step
        steps = self.cfg.train.steps
        while self.step < steps:
            for _ in range(self.accumulation):
                t0 = time.perf_counter()
                batch = next(self.batches)
                data_wait += time.perf_counter() - t0
                x = batch["x"].to(self.device, non_blocking=True)
                if x.dim() == 4 and self.device.type == "cuda" and self.cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for tag, value in self._micro_step(x).items():
                    sums[tag] = sums[tag] + value if tag in sums else value.clone()
                micro_steps += 1
            self.step += 1
            self.samples_seen += self.cfg.train.global_batch
            self._update_ema()
            if self.step % self.cfg.train.log_every == 0 or self.step == steps:
                elapsed = time.perf_counter() - interval_start
                self._log(sums, micro_steps, elapsed, data_wait, run_start, first_step)
                sums, micro_steps, data_wait, interval_start = {}, 0, 0.0, time.perf_counter()
            if self.step % self.cfg.train.ckpt_every == 0 or self.step == steps:
                self._save()
        self.logger.console(f"done: step {self.step}, run folder {self.cfg.train.out_dir}")
        self.logger.close()
        self.run_dir.close()

    def _log(self, sums, micro_steps, elapsed, data_wait, run_start, first_step) -> None:
        tags = sorted(sums)
        # one collective for every figure: the loss means and the count of skipped bad samples
        reduced = torch.stack([sums[t] / max(1, micro_steps) for t in tags]
                              + [torch.tensor(float(self.loader.skipped_total()), device=self.device)])
        dist.all_reduce(reduced)
        *loss_sums, skipped = reduced.tolist()
        values = {t: v / self.world for t, v in zip(tags, loss_sums)}  # mean over ranks
        values["data/skipped_samples"] = skipped
        nonfinite = self._check_finite()
        usage = self.usage.reduce()
        values.update({
            "codebook/utilization": usage["utilization"],
            "codebook/perplexity": usage["perplexity"],
            "codebook/dead_codes": usage["dead_codes"],
            "codebook/entropy_normalized": usage["entropy_normalized"],
            "codebook/top1pct_share": usage["top1pct_share"],
            "opt/lr_g": self.engine_g.get_lr()[0],
            "opt/grad_norm_g": float(self.engine_g.get_global_grad_norm() or 0.0),
            "train/nonfinite_losses": float(nonfinite),
        })
        steps_done = max(1, micro_steps // self.accumulation)
        samples = steps_done * self.cfg.train.global_batch
        values.update({
            "perf/samples_per_s": samples / elapsed,
            "perf/tokens_per_s": samples * self.tokens_per_sample / elapsed,
            "perf/data_wait_frac": min(1.0, data_wait / elapsed),
            "perf/max_mem_gib": _max_memory_gib(self.device),
            "perf/model_tflops_per_gpu": samples * self.flops_per_sample / elapsed / self.world / 1e12,
        })
        spectrum = None
        proj = getattr(self.quantizer, "proj", None)
        if isinstance(proj, nn.Linear):
            spectrum = weight_spectrum(proj.weight)
            values.update({"W/rank": float(spectrum["numerical_rank"]), "W/fro_norm": spectrum["frobenius_norm"],
                           "W/effective_rank": spectrum["effective_rank"]})
        self.logger.scalars(self.step, values)
        if spectrum is not None:
            self.logger.histogram(self.step, "W/singular_values", spectrum["singular_values"])
        self._log_reconstructions()
        total = time.perf_counter() - run_start
        recon_tag = "loss/recon" if "loss/recon" in values else "loss/mel"
        eta = total / max(1, self.step - first_step) * (self.cfg.train.steps - self.step)
        self.logger.console(
            f"step {self.step}/{self.cfg.train.steps} "
            f"g {values.get('loss/total_g', float('nan')):.4f} {recon_tag[5:]} {values.get(recon_tag, float('nan')):.4f} "
            f"d {values.get('loss/d', 0.0):.4f} util {usage['utilization']:.4f} ppl {usage['perplexity']:.1f} "
            f"| {values['perf/samples_per_s']:.1f} samples/s data-wait {values['perf/data_wait_frac']:.0%} "
            f"| eta {format_eta(eta)}")

    @torch.no_grad()
    def _log_reconstructions(self) -> None:
        """EMA reconstructions of a fixed batch: every rank runs the model (the quantizer may be collective)."""
        if not hasattr(self, "recon_batch"):
            self.recon_batch = self._fixed_batch()
        x = self.recon_batch
        with self._autocast():
            x_hat, _ = self.ema(x)
        if x.dim() == 4:
            import torchvision

            n = min(8, x.shape[0])
            grid = torchvision.utils.make_grid(torch.cat([x[:n], x_hat[:n].float()]).add(1).div(2), nrow=n)
            self.logger.image(self.step, "recon/val", grid)
        if x.dim() == 2:  # audio: a couple of clips, and their log-mels (input above reconstruction)
            n = min(2, x.shape[0])
            for i in range(n):
                self.logger.audio(self.step, f"recon/audio_input_{i}", x[i], self.cfg.data.sample_rate)
                self.logger.audio(self.step, f"recon/audio_recon_{i}", x_hat[i].float(), self.cfg.data.sample_rate)
            self.logger.image(self.step, "recon/mel", _mel_image(self.objective.log_mel, x[:n], x_hat[:n].float()))

    def _fixed_batch(self) -> torch.Tensor:
        """The first validation batch, or without validation shards the first batch of a fresh training
        stream (never one of the live stream: that would shift the data a resumed run sees)."""
        data = self.cfg.data
        if data.val_shards:
            loader = build_eval_loader(data, data.val_shards, min(8, self.micro_batch), self.rank, self.world)
        else:
            loader = build_train_loader(data, self.micro_batch, self.rank, self.world)
        return next(iter(loader))["x"][:8].to(self.device)


def _mel_image(log_mel: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(1, H, W) grey image: per example the log-mel of x above that of x_hat, low frequencies at the
    bottom, scaled to [0, 1] by the input's range so the two are comparable."""
    mel, mel_hat = log_mel(x), log_mel(x_hat)  # (n, n_mels, frames)
    low, high = mel.amin(), mel.amax()
    rows = [m.flip(0) for pair in zip(mel, mel_hat) for m in pair]
    return ((torch.cat(rows, dim=0) - low) / (high - low).clamp(min=1e-6)).clamp(0, 1).unsqueeze(0)


def _share_frozen_buffers(ema: nn.Module, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Point the EMA copy's non-persistent buffers (the frozen codebook) at the model's own tensors,
    so they are held once; return the (ema, model) pairs of the persistent buffers, which it follows."""
    pairs = []
    model_modules = dict(model.named_modules())
    for name, ema_module in ema.named_modules():
        source = model_modules[name]
        for buffer_name, buffer in source._buffers.items():
            if buffer is None:
                continue
            if buffer_name in source._non_persistent_buffers_set:
                ema_module._buffers[buffer_name] = buffer
            else:
                pairs.append((ema_module._buffers[buffer_name], buffer))
    return pairs


def _guard_gradients(module: nn.Module, finite: torch.Tensor) -> None:
    """Zero a parameter's gradient on the device when `finite` is False (before any reduction)."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(lambda grad, ok=finite: torch.where(ok, grad, torch.zeros_like(grad)))


def _max_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

