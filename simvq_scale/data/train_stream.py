"""The training stream of one rank: endless, deterministic, equal-size batches, and a position that can be saved.

Reader slots: DataLoader worker w of rank r reads as slot s = r * W + w of S = world_size * W.
  * Shard order: an endless sequence of permutations of the shard list, permutation e seeded by
    (seed, e); slot s takes positions s, s + S, s + 2S, ... of it (its shard number n is position
    s + n * S), so the slots split every pass between them. That is webdataset's split_by_node
    followed by split_by_worker (islice by rank, then by worker) over an endless list, computed by
    position instead, so that a saved position jumps to its shard without replaying the sequence,
    and with the rank given rather than read from the environment.
  * Shuffle: a buffer of `shuffle_buffer` undecoded samples per slot; decoding and cropping come
    after it, with one generator per slot seeded by (seed, rank, w, start epoch).
  * Batches of exactly `batch_size` are formed in the worker, so every rank gets equal batches.

Position (`SlotPosition`): after each batch a slot reports where it stands: the shard number and
sample index of its next raw sample, the (shard number, sample index) of every sample in its shuffle
buffer, its generator's state, and its counts. Resuming from it re-reads the buffered samples from
their shards (a buffered sample is rarely older than a few buffer lengths, so that is about
shuffle_buffer / shard size * ln(shard size) shards, of which local files give only the samples
asked for), skips to the next raw sample and continues exactly as the uninterrupted stream would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from simvq_scale.config import DataConfig
from simvq_scale.data.decode import BadSample, decode_sample
from simvq_scale.data.skips import STREAM_KEY, SkipLog, WorkerReport
from simvq_scale.data.tars import iter_samples

MAX_FAILURES_WITHOUT_SUCCESS = 1000  # a stream in which nothing ever decodes is an error, not a hang


@dataclass
class SlotPosition:
    """Where one reader slot stands (see the module docstring); small, picklable, saved with checkpoints."""

    next_shard: int = 0  # number, in this slot's shard sequence, of the shard the next raw sample comes from
    next_index: int = 0  # index of that sample inside its shard
    buffer: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (shard number, index) per buffered sample
    rng: dict | None = None  # numpy bit-generator state; None: the slot's initial seed
    decoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain types and a tensor only, so a checkpoint loads with torch.load(weights_only=True)."""
        return {"next_shard": self.next_shard, "next_index": self.next_index,
                "buffer": torch.from_numpy(self.buffer.copy()), "rng": self.rng, "decoded": self.decoded,
                "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: dict) -> SlotPosition:
        return cls(next_shard=int(state["next_shard"]), next_index=int(state["next_index"]),
                   buffer=state["buffer"].numpy().astype(np.int64).reshape(-1, 2), rng=state["rng"],
                   decoded=int(state["decoded"]), skipped=dict(state["skipped"]))


def worker_slot() -> tuple[int, int]:
    """(DataLoader worker id, workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def shard_epoch(number: int, slot: int, slots: int, num_shards: int) -> int:
    """The pass over the shard list that shard number `number` of reader `slot` of `slots` belongs to."""
    return (slot + number * slots) // num_shards


class ShardSequence:
    """The endless shard sequence of one slot: shard number n is position slot + n * slots of the permutations."""

    def __init__(self, shards: list[str], seed: int, slot: int, slots: int):
        self.shards, self.seed, self.slot, self.slots = shards, seed, slot, slots
        self._epoch, self._permutation = -1, []

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        return self._permutation

    def first_number_of_epoch(self, epoch: int) -> int:
        """The slot's first shard number whose position lies in `epoch` or later."""
        return max(0, -(-(epoch * len(self.shards) - self.slot) // self.slots))

    def __getitem__(self, number: int) -> str:
        epoch, i = divmod(self.slot + number * self.slots, len(self.shards))
        return self.shards[self.permutation(epoch)[i]]


class TrainStream(IterableDataset):
    """Endless equal-size batches for one rank, each carrying its slot's position after it (STREAM_KEY).

    `starts` (logical worker -> SlotPosition) and `first_worker` are set by the loader before iterating:
    DataLoader worker w plays logical worker (w + first_worker) % W, so the first batch of a resumed
    DataLoader comes from the slot whose turn it was.
    """

    def __init__(self, cfg: DataConfig, shards: list[str], batch_size: int, rank: int, world_size: int):
        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.rank, self.world_size = rank, world_size
        self.starts: dict[int, SlotPosition] = {}
        self.first_worker = 0
        self.start_epoch = 0

    def sequence(self, worker: int, workers: int) -> ShardSequence:
        return ShardSequence(self.shards, self.cfg.seed, self.rank * workers + worker, self.world_size * workers)

    def initial_position(self, worker: int, workers: int) -> SlotPosition:
        return SlotPosition(next_shard=self.sequence(worker, workers).first_number_of_epoch(self.start_epoch))

    def _raw(self, shards: ShardSequence, number: int, skip: int, log: SkipLog) -> Iterator[tuple[int, int, dict]]:
        """(shard number, index, raw sample) from sample `skip` of shard `number` on, endlessly."""
        empty_in_a_row = 0
        while True:
            url = shards[number]
            produced = skip > 0  # the skipped samples were there
            for index, sample in enumerate(iter_samples(url, log.callback(url), start=skip), start=skip):
                produced = True
                yield number, index, sample
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(self.shards):
                raise RuntimeError(f"none of the {len(self.shards)} shards (first {self.shards[0]}) yields a "
                                   f"sample; problems seen: {dict(log.counts)}")
            number, skip = number + 1, 0

    @staticmethod
    def _restore_buffer(shards: ShardSequence, where: np.ndarray) -> list[dict]:
        """The raw samples at the buffer's positions, re-read from their shards (problems were counted before)."""
        wanted: dict[int, dict[int, int]] = {}
        for slot_index, (number, index) in enumerate(where.tolist()):
            wanted.setdefault(number, {})[index] = slot_index
        samples: list[dict] = [{}] * len(where)
        for number in sorted(wanted):
            need = wanted[number]
            indices = sorted(need)
            found = list(iter_samples(shards[number], stop=indices[-1] + 1, wanted=need.__contains__))
            if len(found) < len(indices):  # a shard has every index below its length: the missing ones are the last
                raise RuntimeError(f"cannot restore the data stream's position: shard {shards[number]} no longer "
                                   f"holds sample {indices[len(found)]}; were the shards rewritten since the checkpoint?")
            for index, sample in zip(indices, found):
                samples[need[index]] = sample
        return samples

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        logical = (worker + self.first_worker) % workers
        shards = self.sequence(logical, workers)
        start = self.starts.get(logical) or self.initial_position(logical, workers)
        rng = np.random.default_rng([self.cfg.seed, self.rank, logical, self.start_epoch])
        if start.rng is not None:
            rng.bit_generator.state = start.rng
        log = SkipLog(start.skipped)
        decoded = start.decoded
        size = max(1, self.cfg.shuffle_buffer)
        buffer = self._restore_buffer(shards, start.buffer)
        where = np.zeros((max(size, len(buffer)), 2), np.int64)
        where[: len(buffer)] = start.buffer
        xs, keys = [], []
        for number, index, sample in self._raw(shards, start.next_shard, start.next_index, log):
            if len(buffer) < size:
                where[len(buffer)] = number, index
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            where[i] = number, index
            buffer[i], sample = sample, buffer[i]
            try:
                xs.append(decode_sample(self.cfg, sample, True, rng))
            except BadSample as e:
                log.add(e.reason, sample["__url__"], sample["__key__"], e.detail)
                if decoded == 0 and sum(log.counts.values()) >= MAX_FAILURES_WITHOUT_SUCCESS:
                    raise RuntimeError(f"the first {sum(log.counts.values())} samples of {self.shards[0]} and "
                                       f"others all failed to decode: {dict(log.counts)}; last error: {e}") from None
                continue
            decoded += 1
            keys.append(sample["__key__"])
            if len(xs) == self.batch_size:
                position = SlotPosition(number, index + 1, where[: len(buffer)].copy(), rng.bit_generator.state,
                                        decoded, dict(log.counts))
                records, dropped = log.take()
                yield {"x": default_collate(xs), "key": keys,
                       STREAM_KEY: WorkerReport(logical, dict(log.counts), records, dropped, position)}
                xs, keys = [], []
