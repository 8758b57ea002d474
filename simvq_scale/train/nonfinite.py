"""The non-finite loss guard, decided on the device: no host sync in the step.

An optimizer step in which some micro-step's loss, on some rank, was not finite is skipped: `take` hands the
step's verdict (all-reduced over the ranks, so every rank skips the same steps) to OptimizerStep, which
gives it to the fused AdamW kernel as its found_inf flag; weights, moments and Adam's step count stay as they
were. Every non-finite loss is counted on the device; the count is read (a collective) only at log steps and
saves, where train.nan_policy=stop ends the run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteGuard:
    def __init__(self, modules: list[nn.Module], device: torch.device, policy: str):
        self.policy = policy
        self.count = torch.zeros((), dtype=torch.long, device=device)
        # per module: whether every loss backpropagated through it since its last optimizer step was finite
        self._finite = {id(m): torch.ones((), dtype=torch.bool, device=device) for m in modules}

    def check(self, module: nn.Module, loss: torch.Tensor) -> None:
        """Record whether `loss`, about to be backpropagated through `module`, is finite."""
        finite = torch.isfinite(loss.detach())
        self._finite[id(module)].logical_and_(finite)
        self.count += (~finite).long()

    def take(self, module: nn.Module) -> torch.Tensor:
        """Collective, at an optimizer step of `module`: whether every loss through it since its last step was
        finite on every rank (a bool tensor on the device); starts the next step's record."""
        flag = self._finite[id(module)]
        verdict = flag.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            verdict = verdict.to(torch.uint8)  # MIN over ranks: 0 when any rank saw a non-finite loss
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
            verdict = verdict.bool()
        flag.fill_(True)
        return verdict

    def reduce(self, step: int) -> int:
        """Collective: non-finite losses on all ranks so far; raises under nan_policy=stop."""
        total = self.count.clone()
        dist.all_reduce(total)
        return self.verdict(int(total), step)

    def verdict(self, total: int, step: int) -> int:
        """`total` (already summed over ranks), or FloatingPointError under nan_policy=stop."""
        if total and self.policy == "stop":
            raise FloatingPointError(
                f"{total} non-finite loss(es) before step {step} and train.nan_policy=stop: stopping without "
                f"a checkpoint; `--resume auto` restarts from the last good one")
        return total
