"""Codebook statistics: a usage window over the most recent tokens, and the spectrum of W.

CodebookUsage keeps the indices of the last steps (just enough steps to cover at
least `window_tokens` tokens) plus one running count vector, so the counts are
exact for that window and memory is O(window + K) whatever the step size.

For a sharded codebook a rank may own only rows [start, stop): it counts only
those codes. Two process groups then make the global figures:
  count_group - ranks holding the same rows but seeing different tokens; their
                count vectors are summed. Default: every rank (torch's WORLD)
                for the whole codebook, no one for a row range.
  rows_group  - ranks holding the other row ranges (the shard group); the
                figures' partial sums over rows are combined across it.
reduce() runs collectives: every rank must call it, never inside a rank-0 branch.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

TOP_SHARE_FRACTION = 0.01  # top1pct_share: the share of tokens taken by the top 1% of codes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodebookUsage:
    def __init__(self, codebook_size: int, window_tokens: int, start: int = 0, stop: int | None = None,
                 count_group=None, rows_group=None):
        stop = codebook_size if stop is None else stop
        if window_tokens <= 0:
            raise ValueError(f"usage window_tokens={window_tokens} must be > 0")
        if not 0 <= start < stop <= codebook_size:
            raise ValueError(f"usage row range [{start}, {stop}) is not inside a codebook of {codebook_size} codes")
        self.codebook_size, self.window_tokens, self.start, self.stop = codebook_size, window_tokens, start, stop
        self.whole = (start, stop) == (0, codebook_size)
        self.count_group, self.rows_group = count_group, rows_group
        self.steps: deque[tuple[int, torch.Tensor]] = deque()  # (tokens in the step, its in-range local indices)
        self.tokens = 0
        self.counts = torch.zeros(stop - start, dtype=torch.long)

    def _bincount(self, local: torch.Tensor) -> torch.Tensor:
        # scatter_add rather than torch.bincount, which reads the maximum back to the host on CUDA
        counts = torch.zeros(self.stop - self.start, dtype=torch.long, device=local.device)
        return counts.scatter_add_(0, local, torch.ones_like(local))

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Count one step's indices (any shape, global code numbers); forget steps no longer needed."""
        flat = indices.detach().reshape(-1).long()
        if flat.device.type == "cpu" and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            # checked on the CPU only: on a GPU the check would cost a host sync every step
            raise ValueError(f"code indices span [{int(flat.min())}, {int(flat.max())}], "
                             f"outside a codebook of {self.codebook_size}")
        # the whole codebook needs no mask (boolean indexing syncs with the host)
        local = flat if self.whole else flat[(flat >= self.start) & (flat < self.stop)] - self.start
        if self.counts.device != local.device:
            self.counts = self.counts.to(local.device)
        self.counts += self._bincount(local)
        self.steps.append((flat.numel(), local))
        self.tokens += flat.numel()
        # drop the oldest step while the rest still cover the window: exactly the last >= window_tokens tokens
        while len(self.steps) > 1 and self.tokens - self.steps[0][0] >= self.window_tokens:
            old_tokens, old_local = self.steps.popleft()
            self.tokens -= old_tokens
            self.counts -= self._bincount(old_local)

    @torch.no_grad()
    def reduce(self) -> dict[str, float]:
        """Figures of the window over all ranks' tokens and all rows (the same dict on every rank)."""
        counts = self.counts.clone()
        tokens = torch.tensor([self.tokens], dtype=torch.long, device=counts.device)
        if _distributed() and (self.whole or self.count_group is not None):
            dist.all_reduce(counts, group=self.count_group)
            dist.all_reduce(tokens, group=self.count_group)
        c = counts.double()
        partial = torch.stack([(counts > 0).sum().double(), c.sum(), torch.special.xlogy(c, c).sum()])
        top_k = max(1, math.ceil(TOP_SHARE_FRACTION * self.codebook_size))
        top = torch.zeros(top_k, dtype=torch.double, device=c.device)
        local_top = c.topk(min(top_k, c.numel())).values
        top[: local_top.numel()] = local_top
        if _distributed() and not self.whole and self.rows_group is not None:
            dist.all_reduce(partial, group=self.rows_group)
            gathered = [torch.empty_like(top) for _ in range(dist.get_world_size(self.rows_group))]
            dist.all_gather(gathered, top, group=self.rows_group)
            top = torch.cat(gathered).topk(top_k).values
        used, total, c_log_c = partial.tolist()
        # H = log N - (1/N) sum c log c, in nats
        entropy = math.log(total) - c_log_c / total if total > 0 else 0.0
        return {
            "utilization": used / self.codebook_size,
            "perplexity": math.exp(entropy),
            "entropy_normalized": entropy / math.log(self.codebook_size) if self.codebook_size > 1 else 0.0,
            "dead_codes": float(self.codebook_size - used),
            "top1pct_share": float(top.sum()) / total if total > 0 else 0.0,
            "window_tokens": float(tokens.item()),
        }

    def state_dict(self) -> dict:
        lengths = torch.tensor([local.numel() for _, local in self.steps], dtype=torch.long)
        return {
            "codebook_size": self.codebook_size, "start": self.start, "stop": self.stop,
            "window_tokens": self.window_tokens,
            "step_tokens": torch.tensor([n for n, _ in self.steps], dtype=torch.long),
            "step_lengths": lengths,
            "indices": torch.cat([local.cpu() for _, local in self.steps]) if self.steps
            else torch.zeros(0, dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = (self.codebook_size, self.start, self.stop)
        theirs = (state["codebook_size"], state["start"], state["stop"])
        if mine != theirs:
            raise ValueError(f"usage state for (codebook_size, start, stop)={theirs} cannot load into {mine}")
        device = self.counts.device
        self.steps.clear()
        self.tokens = 0
        self.counts = torch.zeros(self.stop - self.start, dtype=torch.long, device=device)
        chunks = torch.split(state["indices"].to(device), state["step_lengths"].tolist())
        for n, local in zip(state["step_tokens"].tolist(), chunks):
            self.steps.append((n, local))
            self.tokens += n
            self.counts += self._bincount(local)


@torch.no_grad()
def weight_spectrum(weight: torch.Tensor) -> dict:
    """Singular values and rank figures of a matrix (e.g. SimVQ's W), computed in fp32.

    numerical_rank counts singular values above S.max * max(shape) * eps(fp32), the
    default tolerance of numpy / torch.linalg.matrix_rank. effective_rank is
    exp(entropy of S / sum(S)) (Roy & Vetterli, 2007).
    """
    w = weight.detach().float()
    s = torch.linalg.svdvals(w)
    tolerance = s.max() * max(w.shape) * torch.finfo(torch.float32).eps
    p = s.double() / s.double().sum()
    return {
        "singular_values": s.cpu(),
        "numerical_rank": int((s > tolerance).sum()),
        "rank_tolerance": float(tolerance),
        "frobenius_norm": float(torch.linalg.matrix_norm(w)),
        "effective_rank": float(torch.exp(-torch.special.xlogy(p, p).sum())),
    }


def _steps_of(state: dict) -> list[tuple[int, torch.Tensor]]:
    """(tokens, indices) of each step of a usage state, oldest first."""
    chunks = torch.split(state["indices"], state["step_lengths"].tolist())
    return list(zip(state["step_tokens"].tolist(), chunks))


def _state_of(template: dict, steps: list[tuple[int, torch.Tensor]]) -> dict:
    return {**{k: template[k] for k in ("codebook_size", "start", "stop", "window_tokens")},
            "step_tokens": torch.tensor([n for n, _ in steps], dtype=torch.long),
            "step_lengths": torch.tensor([idx.numel() for _, idx in steps], dtype=torch.long),
            "indices": torch.cat([idx for _, idx in steps]) if steps else torch.zeros(0, dtype=torch.long)}


def merge_usage_states(states: list[dict]) -> dict:
    """One usage state holding several ranks' windows (a resume on fewer ranks): the k-th most recent
    steps of all of them become one step, so the summed counts and the order in time are kept."""
    per_rank = [_steps_of(s) for s in states]
    depth = max(len(steps) for steps in per_rank)
    merged = []
    for back in range(depth, 0, -1):  # oldest first, aligned at the most recent step
        parts = [steps[len(steps) - back] for steps in per_rank if len(steps) >= back]
        merged.append((sum(n for n, _ in parts), torch.cat([idx for _, idx in parts])))
    return _state_of(states[0], merged)


def split_usage_state(state: dict, part: int, parts: int) -> dict:
    """Part `part` of `parts` of a usage state (a resume on more ranks): every step's tokens and indices
    cut into nearly equal contiguous pieces, so the parts' counts sum to the whole's."""
    def piece(total: int) -> slice:
        return slice(total * part // parts, total * (part + 1) // parts)

    steps = [(len(range(n)[piece(n)]), idx[piece(idx.numel())]) for n, idx in _steps_of(state)]
    return _state_of(state, steps)
