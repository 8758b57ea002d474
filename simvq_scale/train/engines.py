"""The two DeepSpeed engines: optimizer, LR schedule, ZeRO stage, precision, and what gets compiled.

Precision: DeepSpeed 0.19.8 runs an engine's forward under torch.autocast(enabled=False) unless its own
`torch_autocast` section is on, which kills any autocast opened around engine(x) (measured on an H200:
every convolution ran fp32/TF32). So bf16 is switched on inside the engines with that section, with no
module listed as "lower precision safe": parameters, master weights, gradients and their reductions stay
fp32, only the activations of autocast-eligible ops are bf16. DeepSpeed's own bf16 mode would also cast
every buffer to bf16, and the frozen codebook must stay fp32 for an exact search.

Host syncs: DeepSpeed's ZeRO-1/2 step reads the gradient norm back to the host 3-5 times per step (its
non-finite checks; `bench_train --find-syncs`), its ZeRO-0 clipping twice per step (host-made scalar
tensors), and its throughput timer synchronizes the whole device at every engine forward and step (switched
off). Each drains the launch queue, so every host-bound stretch after it (the optimizer, the next network's
launches) leaves the device idle. A ZeRO-0 engine therefore leaves clipping to `OptimizerStep`,
which clips on the device; it skips a step of non-finite losses or gradients inside the fused AdamW kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from simvq_scale.config import Config


def lr_factor(cfg: Config) -> Callable[[int], float]:
    """Linear warm-up over optim.warmup_steps, then constant or cosine down to min_lr_ratio; a factor of lr."""
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def deepspeed_config(cfg: Config, micro_batch: int, accumulation: int, zero_stage: int, bf16: bool) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.global_batch,
        "gradient_clipping": cfg.optim.grad_clip if zero_stage > 0 else 0.0,  # ZeRO-0: OptimizerStep clips
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # the client AdamW: no FusedAdam compile
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at each engine forward and step, 5 waits per step
        # (audio at batch 80 on an H200: 536.8 s/s with it, 599.8 without); the trainer measures its own speed
        "timers": {"throughput": {"enabled": False}},
    }
    if bf16:
        # no module is "lower precision safe": DeepSpeed would then reduce those gradients in bf16
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def param_groups(model: nn.Module, lr: float, quantizer_lr_scale: float) -> list[dict]:
    """The trainable parameters, the quantizer's (if `model` has one) in a group of its own learning rate."""
    quantizer = getattr(model, "quantizer", None)
    own = {id(p) for p in quantizer.parameters()} if quantizer is not None and quantizer_lr_scale != 1.0 else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    scaled = [p for p in model.parameters() if p.requires_grad and id(p) in own]
    return [{"params": rest, "lr": lr}] + ([{"params": scaled, "lr": lr * quantizer_lr_scale}] if scaled else [])


def build_engine(model: nn.Module, cfg: Config, lr: float, zero_stage: int, micro_batch: int, accumulation: int,
                 bf16: bool, extra_config: dict | None = None):
    """A DeepSpeed engine around `model` with a client AdamW and the run's LR schedule; `extra_config` adds
    DeepSpeed settings (e.g. loading a universal checkpoint)."""
    import deepspeed

    o = cfg.optim
    # fused: one kernel for all tensors, and it honours OptimizerStep's found_inf (a step skipped on the device)
    optimizer = torch.optim.AdamW(param_groups(model, lr, o.quantizer_lr_scale), lr=lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, micro_batch, accumulation, zero_stage, bf16)
                                           | (extra_config or {}))
    if zero_stage == 0 and torch.distributed.get_world_size() == 1:
        # the mean over one rank is the gradient itself; DeepSpeed would still flatten every gradient into a
        # bucket and copy it back (about 800 host ops per image step, counted on a CPU)
        engine.enable_backward_allreduce = False
    return engine


def keep_adamw_fused(optimizer: torch.optim.Optimizer) -> None:
    """After a checkpoint load: the client AdamW fused again, its step counts where the fused kernel keeps them.
    load_state_dict takes the saved param groups' settings, and a checkpoint written before the client AdamW
    was fused says fused=None (step counts on the host); the unfused AdamW refuses OptimizerStep's found_inf."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class OptimizerStep:
    """One engine's optimizer step after its backward, decided on the device, and the gradient norm for the log.

    At the accumulation boundary the step is skipped inside the fused AdamW kernel (its found_inf flag; weights,
    moments and Adam's step count stay as they were) when `losses_finite()` (NonFiniteGuard.take: collective)
    says some micro-step's loss on some rank was not finite, or, at ZeRO-0, when the gradient norm is not.
    ZeRO-0 (DeepSpeed told not to clip): the all-reduced gradients are clipped to `max_norm` on the device,
    nothing read back to the host. ZeRO-1/2: DeepSpeed partitions and clips the gradients itself, with its host
    syncs, and skips a step of non-finite gradients itself."""

    def __init__(self, engine, max_norm: float, zero_stage: int, losses_finite: Callable[[], torch.Tensor]):
        self.engine, self.losses_finite = engine, losses_finite
        self.zero0 = zero_stage == 0
        self.max_norm = max_norm if self.zero0 else 0.0
        device = next(engine.module.parameters()).device
        self.norm = torch.zeros((), device=device)  # ZeRO-0: the last boundary's norm before clipping
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.skip = torch.zeros((), device=device)
        engine.basic_optimizer.found_inf = self.skip  # the client AdamW (fused) reads it at each step: 1 = skip

    def __call__(self) -> None:
        if self.engine.is_gradient_accumulation_boundary():
            proceed = self.losses_finite()
            if self.zero0:
                grads = [p.grad for p in self.params if p.grad is not None]
                self.norm.copy_(torch.nn.utils.get_total_norm(grads, foreach=True))
                proceed = proceed & torch.isfinite(self.norm)
                if self.max_norm:
                    scale = torch.where(proceed, self.max_norm / (self.norm + 1e-6), 1.0).clamp(max=1.0)
                    torch._foreach_mul_(grads, scale)
            self.skip.copy_(~proceed)
        self.engine.step()

    def grad_norm(self) -> float:
        """The last optimizer step's gradient norm before clipping; 0 before the first (a host read: log steps)."""
        if self.zero0:
            return float(self.norm)
        return float(self.engine.get_global_grad_norm() or 0.0)


def compile_networks(networks: dict[str, nn.Module], mode: str, channels_last: bool = False) -> list[str]:
    """torch.compile `networks` (name -> module) in place, before DeepSpeed wraps them (DeepSpeed's
    engine.compile() produced no step within 200 s on an H100). The quantizer stays eager: its search is a
    Triton kernel with collectives around it. In-place Module.compile keeps parameter names, so checkpoints
    and exports do not change. Static shapes (dynamic=False): every shape of a run is fixed, and a graph
    made dynamic after a recompile ran into cuDNN "unable to find an engine" errors on an H200. Each network
    compiles to one or two graphs per gradient mode (D runs with and without gradients to its input); the
    eager islands (the audio encoder's LSTM, the MRD's STFTs) are called outside loops so they cannot split
    a network into a graph per layer.

    channels_last: every compiled graph runs its convolutions NHWC. Inductor chooses that layout itself only
    for graphs in which no 3x3 or larger convolution halves the channels (its decide_layout_opt): the image
    decoder (blocks 512->256->128, output 128->3) and PatchGAN (head 512->1) have such convolutions, so their
    graphs stayed NCHW and cuDNN, whose bf16 kernels are NHWC, transposed around each convolution."""
    import torch._inductor.config

    forget_compiled_graphs()
    torch._inductor.config.force_layout_optimization = channels_last  # read when a graph is compiled
    for module in networks.values():
        module.compile(mode=None if mode == "default" else mode, dynamic=False)
    return list(networks)


def forget_compiled_graphs() -> None:
    """Drop every graph compiled so far in this process. Dynamo caches a graph by the forward's code and its
    guards pass for a new instance of the same module class, so networks compiled again (a second Trainer,
    bench_train's next variant) would run the earlier graphs, their compile settings (mode, layout) silently
    unused."""
    import torch._dynamo

    torch._dynamo.reset()
