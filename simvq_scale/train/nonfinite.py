"""The non-finite loss guard, decided on the device: no host sync in the step.

Under train.nan_policy=skip a micro-step whose loss is not finite contributes zero gradients: a hook on
every parameter multiplies its gradient by the step's finite flag before DeepSpeed reduces it. Every
non-finite loss is counted on the device; the count is read (a collective) only at log steps and saves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteGuard:
    def __init__(self, modules: list[nn.Module], device: torch.device, policy: str):
        self.policy = policy
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self._finite = {id(m): torch.ones((), dtype=torch.bool, device=device) for m in modules}
        if policy == "skip":
            for module in modules:
                flag = self._finite[id(module)]
                for p in module.parameters():
                    if p.requires_grad:
                        # one kernel per gradient (a scalar 0, not a zeros_like tensor to build first)
                        p.register_hook(lambda grad, ok=flag: torch.where(ok, grad, 0.0))

    def check(self, module: nn.Module, loss: torch.Tensor) -> None:
        """Record whether `loss`, about to be backpropagated through `module`, is finite."""
        flag = self._finite[id(module)]
        flag.copy_(torch.isfinite(loss))
        self.count += (~flag).long()

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
