"""Exact nearest-code search over a frozen codebook split across the ranks of a process group.

Tokens stay data-parallel; each rank of the shard group holds only its rows
[start, stop) of C (shard_range, regenerated from the seed) and the replicated W.
One search step:

1. all_gather the token counts of the group, then a padded all_gather of the
   tokens (ranks may hold different numbers, zero included; padding is dropped);
2. search every gathered token against my projected rows (nearest.nearest_code);
3. pack each (distance, global index) into one int64 key whose signed order is
   their lexicographic order, and take ONE all_reduce(MIN) over the keys: the
   global argmin, ties on the lowest index, identical to a single-process search;
4. each rank slices out the indices of its own tokens.

`ShardedCodebook.lookup` brings the selected frozen rows to the rank whose tokens
chose them with all_to_all_single (requests go to the owners, rows come back):
it works on gloo and NCCL (gloo lacks list all_to_all; an all_gather of indices +
owner-filled rows + reduce_scatter also works on both but moves every token's row
to every rank, P times the bytes). q = C[idx] W^T is then computed locally, so W's
gradient is an ordinary data-parallel gradient.

Failures never leave the group hanging:
- A rank whose local search raises (a bug, an out-of-memory) still joins the MIN
  all_reduce, with a failure code in one extra status slot of the key tensor; every
  other rank then raises ShardedSearchError naming it, and the failing rank re-raises
  its own exception. The same status travels with the token counts (bad input shapes)
  and with the lookup's request counts (indices out of range). No extra collective.
- A rank that never reaches the collective (killed, stuck, raising outside these
  functions) is caught by the process group's timeout: init_process_group(timeout=...)
  (distributed.init_distributed(timeout_s)) makes the waiting gloo ranks raise; on
  NCCL the watchdog aborts the communicator after the same timeout.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from simvq_scale.quant.codebook import gaussian_rows, shard_range
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.search import squared_norms

# Key layout: high 32 bits = order-preserving image of the fp32 distance (signed),
# low 32 bits = the global index as an unsigned number, so K may reach 2^32 rows.
INDEX_BITS = 32
MAX_CODEBOOK_SIZE = 2**INDEX_BITS
_INDEX_MASK = MAX_CODEBOOK_SIZE - 1
_KEY_MAX = 2**63 - 1  # what a failed rank contributes: never wins the MIN


class ShardedSearchError(RuntimeError):
    """Another rank of the codebook shard group failed inside a collective search or lookup."""


def check_codebook_size(codebook_size: int) -> None:
    if not 0 < codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size={codebook_size} is outside 1..2^{INDEX_BITS}: the packed (distance, index) "
                         f"int64 key of the sharded search keeps the index in its low {INDEX_BITS} bits")


def pack_keys(distances: torch.Tensor, indices: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """int64 keys whose signed order is the (distance, index) lexicographic order.

    NaN distances are treated as +inf (a NaN never wins) and -0.0 as +0.0 (equal
    distances must tie). `validate` checks that every index fits the low 32 bits.
    """
    if distances.dim() != 1 or distances.shape != indices.shape:
        raise ValueError(f"pack_keys expects distances (n,) and indices (n,), got {tuple(distances.shape)} "
                         f"and {tuple(indices.shape)}")
    if distances.dtype != torch.float32 or indices.dtype != torch.int64:
        raise ValueError(f"pack_keys expects float32 distances and int64 indices, got {distances.dtype} and "
                         f"{indices.dtype}")
    if validate and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= MAX_CODEBOOK_SIZE:
            raise ValueError(f"index range [{low}, {high}] does not fit the {INDEX_BITS}-bit index field of the "
                             f"packed search key (0..{MAX_CODEBOOK_SIZE - 1})")
    finite_or_inf = torch.where(torch.isnan(distances), float("inf"), distances) + 0.0  # -0.0 + 0.0 == +0.0
    bits = finite_or_inf.view(torch.int32)
    # Positive floats already order as their bit patterns; negative ones order reversed,
    # so flip all bits but the sign: the result orders as the floats do, as signed int32.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(torch.int64) * MAX_CODEBOOK_SIZE + indices


def unpack_index(keys: torch.Tensor) -> torch.Tensor:
    return keys & _INDEX_MASK


def _failure_code(group_rank: int, group_size: int) -> int:
    """Negative status; the MIN over the group keeps the lowest failing rank."""
    return group_rank - group_size


def _failed_rank(status: int, group_size: int) -> int:
    return status + group_size


def _input_problem(z: torch.Tensor, codes: torch.Tensor, row_start: int) -> str | None:
    if z.dim() != 2 or codes.dim() != 2 or z.shape[1] != codes.shape[1]:
        return f"sharded_nearest expects z (n, d) and codes (K_local, d), got {tuple(z.shape)} and {tuple(codes.shape)}"
    if row_start < 0 or row_start + codes.shape[0] > MAX_CODEBOOK_SIZE:
        return (f"rows [{row_start}, {row_start + codes.shape[0]}) are outside 0..2^{INDEX_BITS}, the index range "
                f"of the packed search key")
    return None


def sharded_nearest(z: torch.Tensor, codes: torch.Tensor, row_start: int, group: dist.ProcessGroup | None,
                    codes_sq: torch.Tensor | None = None, chunk_size: int = 8192, impl: str = "auto",
                    fallbacks: torch.Tensor | None = None) -> torch.Tensor:
    """Global index (n_local,) of the nearest code for my tokens z (n_local, d); codes are my projected rows.

    Collective over `group`: every rank of it must call this once per step, with any
    number of tokens (zero included). group=None searches locally (a replicated codebook).
    Every rank must give z and codes in the same frame (the keys compare distances without
    ||z||^2, which depends on the frame): SimVQ's is centred on the replicated bias b.
    `fallbacks`: see nearest.nearest_code (this rank's local search, on all gathered tokens).
    """
    problem = _input_problem(z, codes, row_start)
    if group is None:
        if problem:
            raise ValueError(problem)
        return nearest_code(z, codes, codes_sq, chunk_size, impl, fallbacks)[1] + row_start
    group_size, group_rank = dist.get_world_size(group), dist.get_rank(group)
    device = z.device

    header = torch.tensor([-1 if problem else z.shape[0], z.shape[-1]], dtype=torch.int64, device=device)
    headers = torch.empty(group_size * 2, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(headers, header, group=group)
    headers = headers.view(group_size, 2).tolist()
    if problem:
        raise ValueError(problem)
    rejected = [r for r, (count, _) in enumerate(headers) if count < 0]
    if rejected:
        raise ShardedSearchError(f"rank {rejected[0]} of the codebook shard group rejected its tokens (see its error)")
    dims = sorted({dim for _, dim in headers})
    if len(dims) > 1:
        raise ValueError(f"token dimensions differ across the codebook shard group: {[dim for _, dim in headers]}")
    counts = [count for count, _ in headers]
    total, widest = sum(counts), max(counts)
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)

    padded = torch.zeros(widest, z.shape[1], dtype=torch.float32, device=device)
    padded[: z.shape[0]] = z.float()
    gathered = torch.empty(group_size * widest, z.shape[1], dtype=torch.float32, device=device)
    dist.all_gather_into_tensor(gathered, padded, group=group)
    tokens = torch.cat([gathered[r * widest : r * widest + n] for r, n in enumerate(counts)])

    keys = torch.empty(total + 1, dtype=torch.int64, device=device)  # the last slot is the status
    failure: BaseException | None = None
    try:
        distances, local = nearest_code(tokens, codes, codes_sq, chunk_size, impl, fallbacks)
        keys[:total] = pack_keys(distances, local + row_start, validate=False)  # range checked above
        keys[total] = 0
    except Exception as error:  # noqa: BLE001 - reported to the group below, then re-raised
        failure = error
        keys[:total] = _KEY_MAX
        keys[total] = _failure_code(group_rank, group_size)
    dist.all_reduce(keys, op=dist.ReduceOp.MIN, group=group)
    if failure is not None:
        raise failure
    status = int(keys[total])
    if status < 0:
        raise ShardedSearchError(f"the codebook search failed on rank {_failed_rank(status, group_size)} of the "
                                 f"shard group of {group_size} (see its error)")
    first = sum(counts[:group_rank])
    return unpack_index(keys[first : first + counts[group_rank]])


class ShardedCodebook(nn.Module):
    """My rows of C (`weight`) plus a collective search and lookup: the interface of simvq.LocalCodebook."""

    def __init__(self, codebook_size: int, dim: int, seed: int, group: dist.ProcessGroup | None,
                 group_rank: int, group_size: int, chunk_size: int = 8192, search_impl: str = "auto"):
        super().__init__()
        check_codebook_size(codebook_size)
        if not 0 <= group_rank < group_size:
            raise ValueError(f"group_rank={group_rank} is not in 0..group_size-1 (group_size={group_size})")
        if group is None and group_size != 1:
            raise ValueError(f"group_size={group_size} needs a process group; group=None means a replicated codebook")
        if group is not None and (dist.get_rank(group), dist.get_world_size(group)) != (group_rank, group_size):
            raise ValueError(f"group_rank={group_rank}, group_size={group_size} disagree with the process group "
                             f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
        self.codebook_size, self.group, self.group_size = codebook_size, group, group_size
        self.chunk_size, self.search_impl = chunk_size, search_impl
        self.row_range = shard_range(codebook_size, group_rank, group_size)  # also the slice for usage counts
        # Regenerated from the seed on every rank; never broadcast or checkpointed.
        self.register_buffer("weight", gaussian_rows(seed, codebook_size, dim, *self.row_range), persistent=False)
        stops = [shard_range(codebook_size, s, group_size)[1] for s in range(group_size)]
        self.register_buffer("shard_stops", torch.tensor(stops, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def __deepcopy__(self, memo):
        # a copy (the trainer's EMA generator) searches in the same group: the process group is a
        # handle to share, not state to copy (and it cannot be pickled)
        memo[id(self.group)] = self.group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    @torch.no_grad()
    def search(self, z: torch.Tensor, codes: torch.Tensor, fallbacks: torch.Tensor | None = None) -> torch.Tensor:
        """Global index of the nearest code for each row of z (N, d); `codes` are my rows as projected by
        the caller, in z's frame. Collective: every rank of the group calls it once per step."""
        return sharded_nearest(z, codes, self.row_range[0], self.group, squared_norms(codes),
                               self.chunk_size, self.search_impl, fallbacks)

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows C[indices] (fp32, frozen). Collective: every rank of the group calls it with its own indices."""
        flat = indices.reshape(-1).to(self.weight.device)
        bad = bool(flat.numel()) and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size)
        start = self.row_range[0]
        if self.group is None:
            if bad:
                raise ValueError(self._range_message(flat))
            return self.weight[flat - start].reshape(*indices.shape, self.weight.shape[1])
        owner = torch.searchsorted(self.shard_stops, flat, right=True)
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.group_size) if not bad else \
            torch.full((self.group_size,), -1, dtype=torch.int64, device=flat.device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        if bad:
            raise ValueError(self._range_message(flat))
        recv = recv_counts.tolist()
        if min(recv) < 0:
            raise ShardedSearchError(f"rank {recv.index(min(recv))} of the codebook shard group asked for rows "
                                     f"outside 0..{self.codebook_size - 1} (see its error)")
        send = send_counts.tolist()
        requests = torch.empty(sum(recv), dtype=torch.int64, device=flat.device)
        dist.all_to_all_single(requests, flat[order], recv, send, group=self.group)
        answered = torch.empty(flat.numel(), self.weight.shape[1], dtype=self.weight.dtype, device=flat.device)
        dist.all_to_all_single(answered, self.weight[requests - start], send, recv, group=self.group)
        rows = torch.empty_like(answered)
        rows[order] = answered
        return rows.reshape(*indices.shape, self.weight.shape[1])

    def _range_message(self, flat: torch.Tensor) -> str:
        return (f"codebook indices [{int(flat.min())}, {int(flat.max())}] are outside 0..{self.codebook_size - 1}")
