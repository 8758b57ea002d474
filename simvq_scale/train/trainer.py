"""The Trainer: two DeepSpeed engines (generator, discriminator), the GAN step, the loop.

One optimizer step (`train_step`), per micro-batch:
  1. D frozen (requires_grad False); x_hat, q = G(x); G loss (reconstruction terms + commitment +
     adversarial through frozen D); one backward and step of the G engine.
  2. D unfrozen; hinge loss on (x, sg(x_hat)); one backward and step of the D engine (from
     loss.disc_start on; before it the D engine is left alone on every rank).
After the step the EMA generator follows G. The step's figures stay on the device (metrics.py) and are
reduced across ranks only at log steps.

Everything is built in the constructor (models, engines, data stream, checkpoint restore); `fit()` runs
the loop in the run folder. What each piece does lives with it: engines.py (DeepSpeed, precision,
compilation), metrics.py (tags, reduction, writing), state.py (what a resume restores), ema.py,
nonfinite.py, checkpoint.py, and the modality (simvq_scale.modality) for everything image- or
audio-specific.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from simvq_scale import distributed
from simvq_scale.config import Config, dump_config, micro_batch_and_accumulation, to_dict
from simvq_scale.data import SkippedSampleReport, build_eval_loader, build_train_loader
from simvq_scale.inference import EXPORT_NAME, export_generator
from simvq_scale.modality import get_modality
from simvq_scale.quant import build_quantizer
from simvq_scale.train import flops
from simvq_scale.train.checkpoint import Checkpointer
from simvq_scale.train.ema import EMA
from simvq_scale.train.engines import OptimizerStep, build_engine, compile_networks, keep_adamw_fused
from simvq_scale.train.logging import ConsoleLogger, NoOpLogger, RunLogger, Stopwatch, Ticker
from simvq_scale.train.metrics import Metrics
from simvq_scale.train.nonfinite import NonFiniteGuard
from simvq_scale.train.run_dir import CONFIG_FILE, RunDir, resolve_resume
from simvq_scale.train.state import TrainState
from simvq_scale.train.validation import Validation


# Prefix of the profiler ranges that split train_step into its phases (bench_train --profile attributes the
# device's idle time to them).
STEP_PHASE = "step: "


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, resume: str | None = None, overwrite: bool = False,
                 open_run_dir: bool = True):
        """Build everything for `cfg` on `device`; with `resume` ("auto" or a path) restore that checkpoint.

        `open_run_dir` locks and checks train.out_dir first (run_dir.py: one run at a time, nothing
        overwritten without `overwrite`, a resume that fits its checkpoint); --dry-run only looks."""
        self.cfg, self.device = cfg, device
        self.log: NoOpLogger = ConsoleLogger() if distributed.is_main() else NoOpLogger()
        watch = Stopwatch()
        self.modality = get_modality(cfg.data.modality)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.micro_batch, self.accumulation = micro_batch_and_accumulation(
            cfg.train.global_batch, cfg.train.micro_batch, self.world)
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        self.checkpointer = Checkpointer(Path(cfg.train.out_dir), cfg.train.keep_last)

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.quantizer = build_quantizer(cfg.quantizer)
        self.generator = self.modality.build_generator(cfg, self.quantizer).to(device)
        self.discriminator = self.modality.build_discriminator(cfg).to(device)
        self.objective = self.modality.build_objective(cfg).to(device)
        self.sample_shape = self.modality.sample_shape(cfg.data)
        self.tokens_per_sample, self.flops_per_sample = flops.count_per_sample(
            self.generator, self.discriminator, self.sample_shape, list(self.objective.networks().values()))
        networks = {"generator": self.generator, "discriminator": self.discriminator}
        self.run_dir = RunDir(cfg, self.checkpointer) if open_run_dir else None
        if self.run_dir is not None:
            found = self.run_dir.open(resume, overwrite, networks)  # collective; None: start fresh
        else:
            found = self.checkpointer.resume_from = resolve_resume(resume, self.checkpointer.root)
        self.log.console(f"built the models: generator {count_parameters(self.generator):,} and discriminator "
                         f"{count_parameters(self.discriminator):,} parameters, {self.quantizer.codebook_size:,} "
                         f"codes ({watch.lap():.1f} s)")

        self.loader = build_train_loader(cfg.data, self.micro_batch * self.accumulation, self.rank, self.world)
        self.recon_batch = self._fixed_batch()
        self.validation = Validation(cfg, self.modality, self.objective, device, self.micro_batch, self.rank,
                                     self.world, self.log.console) if cfg.train.val_every else None
        if self.quantizer.init_from_data and found is None:  # a resume takes W and b from the checkpoint
            self._init_quantizer_from_data()
        self.log.console(f"opened the data ({watch.lap():.1f} s)")

        self.state = TrainState(ema=EMA(self.generator, cfg.model.ema_decay))  # before compile: no deep copy then
        self.compiled = self._compile_enabled()
        self.channels_last = self.compiled and self.modality.channels_last(cfg)
        if self.compiled:
            names = compile_networks({"encoder": self.generator.encoder, "decoder": self.generator.decoder,
                                      "discriminator": self.discriminator, **self.objective.networks()},
                                     cfg.train.compile_mode, self.channels_last)
            self.log.console(f"compiling {', '.join(names)} (mode {cfg.train.compile_mode}): the first steps "
                             "take longer while the compiler works")
        # a resume at another world size loads DeepSpeed's universal checkpoint (checkpointer.deepspeed_config)
        self.engine_g = build_engine(self.generator, cfg, cfg.optim.lr, cfg.optim.zero_stage_g, self.micro_batch,
                                     self.accumulation, self.bf16, self.checkpointer.deepspeed_config(cfg.optim.zero_stage_g))
        self.engine_d = build_engine(self.discriminator, cfg, cfg.optim.disc_lr or cfg.optim.lr,
                                     cfg.optim.zero_stage_d, self.micro_batch, self.accumulation, self.bf16,
                                     self.checkpointer.deepspeed_config(cfg.optim.zero_stage_d))
        self.guard = NonFiniteGuard([self.generator, self.discriminator], device, cfg.train.nan_policy)
        self.step_g = OptimizerStep(self.engine_g, cfg.optim.grad_clip, cfg.optim.zero_stage_g,
                                    lambda: self.guard.take(self.generator))
        self.step_d = OptimizerStep(self.engine_d, cfg.optim.grad_clip, cfg.optim.zero_stage_d,
                                    lambda: self.guard.take(self.discriminator))
        self.metrics = Metrics(cfg, self.modality, self.log, device, self.quantizer.codebook_size,
                               self.tokens_per_sample, self.flops_per_sample, flops.peak_flops(device))
        self.log.console(f"built the DeepSpeed engines (ZeRO {cfg.optim.zero_stage_g} / {cfg.optim.zero_stage_d}, "
                         f"{'bf16' if self.bf16 else 'fp32'}) ({watch.lap():.1f} s)")
        if found is not None:
            self._restore(*found)

    # ------------------------------------------------------------------ set-up helpers

    def _compile_enabled(self) -> bool:
        setting = self.cfg.train.compile
        return setting == "true" or (setting == "auto" and self.device.type == "cuda")

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
            "compile": self.compiled,
            "device": self.device.type,
        } | self.modality.describe(self.cfg, self.tokens_per_sample, self.quantizer.codebook_size)

    @torch.no_grad()
    def _init_quantizer_from_data(self) -> None:
        """quantizer.simvq.init_from_data: W and b from the encoder's tokens on one batch per rank (all ranks'
        statistics), before the engines exist (ZeRO keeps its own master copy of the weights after)."""
        batch = next(iter(build_train_loader(self.cfg.data, self.micro_batch, self.rank, self.world)))
        with self._autocast():
            z = self.generator.encoder(batch["x"].to(self.device))
        self.quantizer.init_from_tokens(z.float().movedim(1, -1).reshape(-1, z.shape[1]))

    def _fixed_batch(self) -> torch.Tensor:
        """The batch whose EMA reconstructions are logged: the first validation batch, or without validation
        shards the first batch of a fresh training stream (never one of the live stream)."""
        data = self.cfg.data
        if data.val_shards:
            loader = build_eval_loader(data, data.val_shards, min(8, self.micro_batch), self.rank, self.world)
        else:
            loader = build_train_loader(data, self.micro_batch, self.rank, self.world)
        return next(iter(loader))["x"][:8].to(self.device)

    def _autocast(self):
        """bf16 autocast for what runs outside the engines' forward (losses, D inside the G loss, the EMA)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ------------------------------------------------------------------ the step

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch from the loader on this rank's device, in the memory layout the networks run in."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:  # images; waveforms (B, T) have no 2-D layout
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self, batch: torch.Tensor) -> None:
        """One optimizer step of G and D on this rank's part of the global batch (micro_batch x accumulation
        samples, split into micro-batches here); its figures go to the metrics, on the device."""
        adversarial = self.state.step >= self.cfg.loss.disc_start
        for x in batch.split(self.micro_batch):
            x_hat, parts = self.generator_step(x, adversarial)
            if adversarial:
                parts.update(self.discriminator_step(x, x_hat))
            with record_function(f"{STEP_PHASE}metrics"):
                self.metrics.add(parts)
        self.state.step += 1
        self.state.samples_seen += self.cfg.train.global_batch
        with record_function(f"{STEP_PHASE}EMA update"):
            self.state.ema.update(self.generator)

    def generator_step(self, x: torch.Tensor, adversarial: bool = True) -> tuple[torch.Tensor, dict]:
        """One forward/backward/step of the G engine with D frozen; returns (sg(x_hat), loss parts).

        D is called as a plain module here, not through its engine: in this step it is a fixed function
        that only passes gradients to x_hat; its engine sees exactly one forward and backward per
        micro-step, in discriminator_step."""
        disc = self.engine_d.module
        disc.requires_grad_(False)
        try:
            with self._autocast(), record_function(f"{STEP_PHASE}G forward and loss"):
                x_hat, quant = self.engine_g(x)
                loss, parts = self.objective.generator_loss(x, x_hat, quant, disc if adversarial else None,
                                                            self.generator.last_layer)
            with record_function(f"{STEP_PHASE}G backward"):
                self.guard.check(self.generator, loss)
                self.engine_g.backward(loss)
            with record_function(f"{STEP_PHASE}G optimizer step"):
                self.step_g()
        finally:
            disc.requires_grad_(True)
        with record_function(f"{STEP_PHASE}metrics"):
            self.metrics.add_indices(quant.indices)
        parts.update({f"quantizer/{name}": value for name, value in quant.stats.items()})
        return x_hat.detach(), parts

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward/backward/step of the D engine on (x, sg(x_hat))."""
        with self._autocast(), record_function(f"{STEP_PHASE}D forward and loss"):
            loss, parts = self.objective.discriminator_loss(self.engine_d, x, x_hat)
        with record_function(f"{STEP_PHASE}D backward"):
            self.guard.check(self.discriminator, loss)
            self.engine_d.backward(loss)
        with record_function(f"{STEP_PHASE}D optimizer step"):
            self.step_d()
        return parts

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        """Train to cfg.train.steps in the run folder, logging, checkpointing and exporting on the way."""
        cfg = self.cfg
        out = Path(cfg.train.out_dir)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / CONFIG_FILE)
            self.log = self.metrics.logger = RunLogger(out)
        dist.barrier()
        self.metrics.write_run_info()
        self.engine_g.train()
        self.engine_d.train()
        self.skip_report = SkippedSampleReport(out / "skipped_samples.jsonl", distributed.is_main())
        self.batches = iter(self.loader)  # from the restored position after a resume; saves do not restart it
        first = True
        while self.state.step < cfg.train.steps:
            t0 = time.perf_counter()
            batch = next(self.batches)
            waited = time.perf_counter() - t0
            # the first compiled step compiles for minutes (130 s for image_262k on an H200): say it is alive
            compiling = first and self.compiled
            with Ticker(self.log.console, "first step: still compiling") if compiling else nullcontext():
                self.train_step(self.to_device(batch["x"]))
            self.metrics.end_step(waited)
            if first:
                self.log.console(f"first step done ({time.perf_counter() - t0:.1f} s{', compiling' if self.compiled else ''})")
                first = False
            step = self.state.step
            validate = self.validation is not None and self.validation.due(step)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or validate:
                self._log(step, validate)
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                self.save()
        self.log.console(f"done: step {self.state.step}, run folder {cfg.train.out_dir}")
        self.log.close()
        if self.run_dir is not None:
            self.run_dir.close()

    def _log(self, step: int, validate: bool = False) -> None:
        """The log step: every rank reduces (one collective), rank 0 writes."""
        images = self.metrics.log_steps % self.cfg.train.images_every == 0
        host = {"opt/lr_g": self.engine_g.get_lr()[0], "opt/lr_d": self.engine_d.get_lr()[0],
                "opt/grad_norm_g": self.step_g.grad_norm(),
                "opt/grad_norm_d": self.step_d.grad_norm()}  # 0 before D's first step
        counters = {"data/skipped_samples": torch.tensor(float(self.loader.skipped_total()), device=self.device),
                    "train/nonfinite_losses": self.guard.count,
                    "quantizer/search_fallbacks": self.quantizer.search_fallbacks}
        if validate:  # its own collective; its figures join this row
            started = time.perf_counter()
            host |= self.validation.run(step, self.reconstruct, self.log.console)
            self.metrics.leave_out(time.perf_counter() - started)
        values = self.metrics.log(step, counters, host, self.quantizer.projection_weight(), images)
        self.skip_report.publish(step, self.loader, values["data/skipped_samples"], self.log.console)  # collective
        self.guard.verdict(int(values["train/nonfinite_losses"]), step)
        if images:
            self._log_reconstructions(step)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The EMA generator's reconstruction of a batch (every rank calls it: the quantizer may be collective)."""
        with self._autocast():
            return self.state.ema.module(self.to_device(x))[0]

    def _log_reconstructions(self, step: int) -> None:
        """EMA reconstructions of the fixed batch."""
        self.modality.log_reconstructions(self.log, step, self.recon_batch, self.reconstruct(self.recon_batch),
                                          self.cfg, self.objective)

    # ------------------------------------------------------------------ state

    def _client_state(self) -> dict:
        # flat (step, samples_seen, ema at the top): the layout checkpoints have had from the start
        return {**self.state.state_dict(), "world_size": self.world, "config": to_dict(self.cfg)}

    def _restore(self, root: Path, tag: str) -> None:
        client, rank_state = self.checkpointer.load(root, tag, self.engine_g, self.engine_d)
        for engine in (self.engine_g, self.engine_d):
            keep_adamw_fused(engine.basic_optimizer)
        self.state.load_state_dict(client)
        if rank_state is not None:  # re-split by the checkpointer when the world size changed
            self.state.load_rank_state_dict(rank_state)
            if self.state.data:  # no position (another world size, an older checkpoint): the next pass
                self.loader.load_state_dict(self.state.data)
            self.metrics.usage.load_state_dict(rank_state["usage"])
        self.log.console(f"resumed from {root}/*/{tag} at step {self.state.step} "
                         f"({self.state.samples_seen} samples seen)")

    def save(self) -> None:
        """Collective: a checkpoint of both engines and the train state, then the EMA export (rank 0)."""
        self.guard.reduce(self.state.step)
        # each rank's loader position (of the batches consumed so far) goes into its own rank file
        self.state.data = self.loader.state_dict()
        self.checkpointer.save(self.state.step, self.engine_g, self.engine_d, self._client_state(),
                               {**self.state.rank_state_dict(), "usage": self.metrics.usage.state_dict()})
        if distributed.is_main():
            export_generator(self.state.ema.module, self.cfg, self.state.step, Path(self.cfg.train.out_dir) / EXPORT_NAME)
