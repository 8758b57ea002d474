"""Training and evaluation loaders over WebDataset shards, for images and audio alike.

Training (`build_train_loader`): an infinite, deterministic stream per (rank, worker).
  * Shard order: an endless sequence of permutations of the shard list, permutation e seeded by
    (seed, resume_counter, e); reader slot s = rank * workers + worker takes positions s, s + S,
    s + 2S, ... (S = world_size * workers), so the slots split every pass between them and a
    resumed run (a new resume_counter) does not replay the same order from the start.
  * Shuffle: a buffer of `shuffle_buffer` undecoded samples per slot; decoding and cropping come
    after it, with a generator seeded by (seed, rank, worker, resume_counter).
  * Batches of exactly `batch_size` are formed in the worker, so every rank gets equal batches.
Evaluation (`build_eval_loader`): the samples of the given shards (counted from the tar headers
at build time) are cut into contiguous ranges, one per rank and inside it one per worker; every
sample is read once, and the last batches are padded (mask False) so that every rank yields the
same number of batches.

Bad data never stops a run: undecodable or truncated samples, unreadable tars and empty audio are
skipped in training and masked in evaluation, and counted; `loader.skipped()` returns the counts
by reason (summed over workers and over every pass made so far) for logging. A shard pattern that
matches nothing raises ShardPatternError at build time, naming the pattern.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from simvq_scale.config import DataConfig
from simvq_scale.data.decode import BadSample
from simvq_scale.data.tars import count_samples, expand_shards, iter_samples
from simvq_scale.modality import get_modality

STATS_KEY = "_skipped"  # per-batch (worker, cumulative counts) travelling from a worker to the loader
MAX_FAILURES_WITHOUT_SUCCESS = 1000  # a stream in which nothing ever decodes is an error, not a hang
TAR_LEVEL_PROBLEMS = ("truncated_tar", "unreadable_tar")


def _check_setup(cfg: DataConfig, batch_size: int, rank: int, world_size: int) -> None:
    get_modality(cfg.modality)  # an unknown modality is a ConfigError naming the choices
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if cfg.workers < 0:
        raise ValueError(f"data.workers={cfg.workers} must be >= 0")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def sample_shape(cfg: DataConfig) -> tuple[int, ...]:
    return get_modality(cfg.modality).sample_shape(cfg)


def decode_sample(cfg: DataConfig, sample: dict, train: bool, rng: np.random.Generator) -> torch.Tensor:
    return get_modality(cfg.modality).decode(cfg, sample, train, rng)


def shard_order(num_shards: int, seed: int, resume_counter: int, slot: int, slots: int) -> Iterator[int]:
    """Endless shard indices for reader `slot` of `slots` (see the module docstring)."""
    def passes() -> Iterator[int]:
        for epoch in itertools.count():
            yield from np.random.default_rng([seed, resume_counter, epoch]).permutation(num_shards).tolist()
    return itertools.islice(passes(), slot, None, slots)


def shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Samples in random order through a buffer of `size` (<= 1: unchanged order); flushes at the end."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class TrainStream(IterableDataset):
    """Endless equal-size batches for one rank; see the module docstring for the seeding."""

    def __init__(self, cfg: DataConfig, shards: list[str], batch_size: int, rank: int, world_size: int,
                 resume_counter: int):
        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.rank, self.world_size, self.resume_counter = rank, world_size, resume_counter

    def _raw(self, slot: int, slots: int, counts: Counter) -> Iterator[dict]:
        def count(kind: str, detail: str) -> None:
            counts[kind] += 1

        empty_in_a_row = 0
        for index in shard_order(len(self.shards), self.cfg.seed, self.resume_counter, slot, slots):
            produced = 0
            for sample in iter_samples(self.shards[index], count):
                produced += 1
                yield sample
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(self.shards):
                raise RuntimeError(f"none of the {len(self.shards)} shards (first {self.shards[0]}) yields a "
                                   f"sample; problems seen: {dict(counts)}")

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker, self.resume_counter])
        counts: Counter = Counter()
        decoded = 0
        xs, keys = [], []
        for sample in shuffled(self._raw(slot, slots, counts), self.cfg.shuffle_buffer, rng):
            try:
                xs.append(decode_sample(self.cfg, sample, True, rng))
            except BadSample as e:
                counts[e.reason] += 1
                if decoded == 0 and sum(counts.values()) >= MAX_FAILURES_WITHOUT_SUCCESS:
                    raise RuntimeError(f"the first {sum(counts.values())} samples of {self.shards[0]} and "
                                       f"others all failed to decode: {dict(counts)}; last error: {e}") from None
                continue
            decoded += 1
            keys.append(sample["__key__"])
            if len(xs) == self.batch_size:
                yield {"x": torch.stack(xs), "key": keys, STATS_KEY: (worker, dict(counts))}
                xs, keys = [], []


def split_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of contiguous part `part` of `parts` nearly equal parts of range(total)."""
    return total * part // parts, total * (part + 1) // parts


class EvalStream(IterableDataset):
    """Every sample of this rank's range once, in batches padded to `batch_size` with mask False."""

    def __init__(self, cfg: DataConfig, shards: list[str], counts: list[int], batch_size: int, rank: int,
                 world_size: int):
        self.cfg, self.shards, self.counts, self.batch_size = cfg, shards, counts, batch_size
        self.rank, self.world_size = rank, world_size

    def _worker_range(self, rank: int, worker: int, workers: int) -> tuple[int, int]:
        start, stop = split_range(sum(self.counts), self.world_size, rank)
        a, b = split_range(stop - start, workers, worker)
        return start + a, start + b

    def batches_per_rank(self, workers: int) -> int:
        """The batch count every rank yields: the largest any rank needs."""
        def needed(rank: int) -> int:
            sizes = [b - a for a, b in (self._worker_range(rank, w, workers) for w in range(workers))]
            return sum(-(-n // self.batch_size) for n in sizes)
        return max(needed(r) for r in range(self.world_size))

    def _raw(self, start: int, stop: int, counts: Counter) -> Iterator[dict | None]:
        """Exactly stop - start items: the samples of [start, stop), None where one could not be read."""
        def count(kind: str, detail: str) -> None:
            if kind not in TAR_LEVEL_PROBLEMS:  # those were counted once, when the shards were counted
                counts[kind] += 1

        offset = 0
        for path, n in zip(self.shards, self.counts):
            lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
            if lo < hi:
                got = 0
                for sample in iter_samples(path, count, lo, hi):
                    got += 1
                    yield sample
                if got < hi - lo:  # the shard changed or broke since it was counted
                    counts["missing_sample"] += hi - lo - got
                    yield from itertools.repeat(None, hi - lo - got)
            offset += n

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        start, stop = self._worker_range(self.rank, worker, workers)
        rng = np.random.default_rng(0)  # unused by evaluation decoding, which is deterministic
        counts: Counter = Counter()
        shape = sample_shape(self.cfg)
        xs, keys, mask = [], [], []
        items = self._raw(start, stop, counts)
        for sample in itertools.chain(items, itertools.repeat(None, -(stop - start) % self.batch_size)):
            x = None
            if sample is not None:
                try:
                    x = decode_sample(self.cfg, sample, False, rng)
                except BadSample as e:
                    counts[e.reason] += 1
            xs.append(torch.zeros(shape) if x is None else x)
            keys.append("" if x is None else sample["__key__"])
            mask.append(x is not None)
            if len(xs) == self.batch_size:
                yield {"x": torch.stack(xs), "key": keys, "mask": torch.tensor(mask), STATS_KEY: (worker, dict(counts))}
                xs, keys, mask = [], [], []


class ShardLoader:
    """Iterable of batch dicts from a TrainStream or EvalStream through a torch DataLoader.

    `skipped()` -> {reason: count} of bad data seen so far (all workers, all passes); `skipped_total()`
    is their sum. Evaluation loaders have `len()` (the batch count, equal on every rank).
    """

    def __init__(self, stream: TrainStream | EvalStream, workers: int, num_batches: int | None = None,
                 found_at_build: Counter | None = None):
        self.stream, self.workers, self.num_batches = stream, workers, num_batches
        self._finished_passes: Counter = Counter(found_at_build or {})
        self._current: dict[int, dict] = {}

    def skipped(self) -> dict[str, int]:
        total = Counter(self._finished_passes)
        for counts in self._current.values():
            total.update(counts)
        return dict(total)

    def skipped_total(self) -> int:
        return sum(self.skipped().values())

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a training loader is endless and has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        self._finished_passes = Counter(self.skipped())
        self._current = {}
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.workers else None)
        produced = 0
        for batch in loader:
            worker, counts = batch.pop(STATS_KEY)
            self._current[worker] = counts
            produced += 1
            yield batch
        if self.num_batches is not None:
            shape = (self.stream.batch_size, *sample_shape(self.stream.cfg))
            for _ in range(self.num_batches - produced):
                yield {"x": torch.zeros(shape), "key": [""] * self.stream.batch_size,
                       "mask": torch.zeros(self.stream.batch_size, dtype=torch.bool)}


def build_train_loader(cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                       resume_counter: int = 0) -> ShardLoader:
    """Endless loader of {"x": (B,3,H,W) in [-1,1] | (B,T) float32, "key": list[str]} for this rank.

    Reads `cfg.train_shards` with `cfg.workers` DataLoader workers (0: in this process).
    `resume_counter` (e.g. the number of restarts, or the step at which the run resumed) reseeds the
    shard order, shuffle and crops, so a resumed run does not replay its first batches.
    Bad data is skipped; `loader.skipped()` returns the counts by reason. Iterate it once: every new
    `iter()` starts the stream again from the same seed (pass a new resume_counter to continue instead).
    """
    _check_setup(cfg, batch_size, rank, world_size)
    shards = expand_shards(cfg.train_shards)
    return ShardLoader(TrainStream(cfg, shards, batch_size, rank, world_size, resume_counter), cfg.workers)


def build_eval_loader(cfg: DataConfig, shards: str, batch_size: int, rank: int, world_size: int) -> ShardLoader:
    """Finite loader of {"x", "key", "mask": (B,) bool, False for padding} over every sample of `shards` once.

    The samples are split between ranks (and their workers) in contiguous ranges; every rank yields
    `len(loader)` batches, the same number on every rank. Samples that fail to decode are masked out
    and counted in `loader.skipped()`. Ranks are given explicitly; torch.distributed is not needed.
    """
    _check_setup(cfg, batch_size, rank, world_size)
    paths = expand_shards(shards)
    problems: Counter = Counter()

    def count(kind: str, detail: str) -> None:
        problems[kind] += 1

    counts = [count_samples(p, count) for p in paths]
    stream = EvalStream(cfg, paths, counts, batch_size, rank, world_size)
    return ShardLoader(stream, cfg.workers, stream.batches_per_rank(max(cfg.workers, 1)), problems)
