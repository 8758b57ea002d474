"""Codebook statistics: a usage window over the most recent tokens, its figures, and the spectrum of W.

CodebookUsage keeps the indices of the last steps (just enough steps to cover at least `window_tokens`
tokens) plus one running count vector, so the counts are exact for that window and memory is
O(window + K) whatever the step size. Every rank counts the global code numbers its own tokens chose
(also with a sharded codebook), so the global counts are one sum over ranks: `reduce()` runs that
all-reduce itself (a collective: every rank calls it), or a caller packs `counts` into a collective of
its own and calls `usage_figures` on the result (the trainer's metrics do, to keep one collective per
log step).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from simvq_scale.distributed import world_size

TOP_SHARE_FRACTION = 0.01  # top1pct_share: the share of tokens taken by the top 1% of codes


class CodebookUsage:
    def __init__(self, codebook_size: int, window_tokens: int):
        if window_tokens <= 0:
            raise ValueError(f"usage window_tokens={window_tokens} must be > 0")
        self.codebook_size, self.window_tokens = codebook_size, window_tokens
        self.steps: deque[torch.Tensor] = deque()  # each step's indices, flat
        self.tokens = 0
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def _bincount(self, flat: torch.Tensor) -> torch.Tensor:
        # scatter_add rather than torch.bincount, which reads the maximum back to the host on CUDA
        counts = torch.zeros(self.codebook_size, dtype=torch.long, device=flat.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Count one step's indices (any shape, global code numbers); forget steps no longer needed."""
        flat = indices.detach().reshape(-1).long()
        if flat.device.type == "cpu" and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            # checked on the CPU only: on a GPU the check would cost a host sync every step
            raise ValueError(f"code indices span [{int(flat.min())}, {int(flat.max())}], "
                             f"outside a codebook of {self.codebook_size}")
        if self.counts.device != flat.device:
            # the first step on the training device, after construction or a restore (which loads on the CPU):
            # the kept steps move too, or forgetting one of them would mix devices
            self.counts = self.counts.to(flat.device)
            self.steps = deque(step.to(flat.device) for step in self.steps)
        self.counts += self._bincount(flat)
        self.steps.append(flat)
        self.tokens += flat.numel()
        # drop the oldest step while the rest still cover the window: exactly the last >= window_tokens tokens
        while len(self.steps) > 1 and self.tokens - self.steps[0].numel() >= self.window_tokens:
            old = self.steps.popleft()
            self.tokens -= old.numel()
            self.counts -= self._bincount(old)

    @torch.no_grad()
    def reduce(self) -> dict[str, float]:
        """Figures of the window over all ranks' tokens (the same dict on every rank). Collective."""
        counts = self.counts.clone()
        tokens = torch.tensor([self.tokens], dtype=torch.long, device=counts.device)
        if world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(tokens)
        return usage_figures(counts) | {"window_tokens": float(tokens.item())}

    def state_dict(self) -> dict:
        return {
            "codebook_size": self.codebook_size, "window_tokens": self.window_tokens,
            "step_lengths": torch.tensor([s.numel() for s in self.steps], dtype=torch.long),
            "indices": torch.cat([s.cpu() for s in self.steps]) if self.steps else torch.zeros(0, dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["codebook_size"] != self.codebook_size:
            raise ValueError(f"usage state of a codebook of {state['codebook_size']} codes cannot load into "
                             f"one of {self.codebook_size}")
        device = self.counts.device
        self.steps.clear()
        self.tokens = 0
        self.counts = torch.zeros(self.codebook_size, dtype=torch.long, device=device)
        for flat in torch.split(state["indices"].to(device), state["step_lengths"].tolist()):
            self.steps.append(flat)
            self.tokens += flat.numel()
            self.counts += self._bincount(flat)


@torch.no_grad()
def usage_figures(counts: torch.Tensor) -> dict[str, float]:
    """Utilization, perplexity, normalized entropy, dead codes and top-1% share of global code counts (K,)."""
    codebook_size = counts.numel()
    c = counts.double()
    top_k = max(1, math.ceil(TOP_SHARE_FRACTION * codebook_size))
    used, total, c_log_c, top = torch.stack([
        (c > 0).sum().double(), c.sum(), torch.special.xlogy(c, c).sum(), c.topk(top_k).values.sum()]).tolist()
    entropy = math.log(total) - c_log_c / total if total > 0 else 0.0  # H = log N - (1/N) sum c log c, nats
    return {
        "utilization": used / codebook_size,
        "perplexity": math.exp(entropy),
        "entropy_normalized": entropy / math.log(codebook_size) if codebook_size > 1 else 0.0,
        "dead_codes": float(codebook_size - used),
        "top1pct_share": top / total if total > 0 else 0.0,
    }


@torch.no_grad()
def weight_spectrum(weight: torch.Tensor, rank_rtol: float = 1e-2) -> dict:
    """Singular values and rank figures of a matrix (e.g. SimVQ's W), computed in fp32.

    rank counts singular values above rank_rtol * S.max: the numerical rank at a relative tolerance,
    the quantity that falls over training in the paper's Fig. 4. rank_fp32 counts those above
    S.max * max(shape) * eps(fp32), the default tolerance of numpy / torch.linalg.matrix_rank (it stays at
    d unless a direction of W is exactly lost). effective_rank is exp(entropy of S / sum(S)) (Roy &
    Vetterli, 2007).
    """
    w = weight.detach().float()
    s = torch.linalg.svdvals(w)
    fp32_tolerance = s.max() * max(w.shape) * torch.finfo(torch.float32).eps
    p = s.double() / s.double().sum()
    return {
        "singular_values": s.cpu(),
        "rank": int((s > rank_rtol * s.max()).sum()),
        "rank_fp32": int((s > fp32_tolerance).sum()),
        "frobenius_norm": float(torch.linalg.matrix_norm(w)),
        "effective_rank": float(torch.exp(-torch.special.xlogy(p, p).sum())),
    }


def _steps_of(state: dict) -> list[torch.Tensor]:
    """The indices of each step of a usage state, oldest first."""
    return list(torch.split(state["indices"], state["step_lengths"].tolist()))


def _state_of(template: dict, steps: list[torch.Tensor]) -> dict:
    return {"codebook_size": template["codebook_size"], "window_tokens": template["window_tokens"],
            "step_lengths": torch.tensor([idx.numel() for idx in steps], dtype=torch.long),
            "indices": torch.cat(steps) if steps else torch.zeros(0, dtype=torch.long)}


def merge_usage_states(states: list[dict]) -> dict:
    """One usage state holding several ranks' windows (a resume on fewer ranks): the k-th most recent
    steps of all of them become one step, so the summed counts and the order in time are kept."""
    per_rank = [_steps_of(s) for s in states]
    depth = max(len(steps) for steps in per_rank)
    merged = [torch.cat([steps[len(steps) - back] for steps in per_rank if len(steps) >= back])
              for back in range(depth, 0, -1)]  # oldest first, aligned at the most recent step
    return _state_of(states[0], merged)


def split_usage_state(state: dict, part: int, parts: int) -> dict:
    """Part `part` of `parts` of a usage state (a resume on more ranks): every step's indices cut into
    nearly equal contiguous pieces, so the parts' counts sum to the whole's."""
    def piece(total: int) -> slice:
        return slice(total * part // parts, total * (part + 1) // parts)

    return _state_of(state, [idx[piece(idx.numel())] for idx in _steps_of(state)])
