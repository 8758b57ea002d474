"""Training and evaluation loaders over WebDataset shards (local paths or URLs), for images and audio alike.

Training (`build_train_loader`): an endless, deterministic stream per rank (train_stream.py: shard
order, shuffle of undecoded samples, decode and crop after it, equal batches). The loader's
`state_dict()` is the position of the batches consumed so far (not of those the workers have
prefetched); `load_state_dict()` on a fresh loader continues exactly there, so a resumed run reads
what an uninterrupted one reads, whatever the checkpoint interval, and saving restarts nothing.
Evaluation (`build_eval_loader`): every sample of the given shards once across ranks, the same
number of batches on every rank (eval_stream.py).

Bad data never stops a run: undecodable or truncated samples, unreadable tars and empty audio are
skipped in training and masked in evaluation, and counted: `loader.skipped()` returns the counts by
reason (summed over workers, and in training over the whole run including before a resume), and
`loader.take_skipped_records()` the named records (shard URL, key, reason) since its last call. A
shard pattern that matches nothing raises ShardPatternError at build time, naming the pattern.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from simvq_scale.config import DataConfig
from simvq_scale.data.decode import sample_shape
from simvq_scale.modality import get_modality
from simvq_scale.data.eval_stream import EvalStream, count_shards
from simvq_scale.data.skips import MAX_PENDING_RECORDS, STREAM_KEY, SkipLog, WorkerReport
from simvq_scale.data.tars import expand_shards
from simvq_scale.data.train_stream import SlotPosition, TrainStream, shard_epoch

STATE_FORMAT = 1


def _check_setup(cfg: DataConfig, batch_size: int, rank: int, world_size: int) -> None:
    get_modality(cfg.modality)  # an unknown modality is a ConfigError naming the choices
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if cfg.workers < 0:
        raise ValueError(f"data.workers={cfg.workers} must be >= 0")


class ShardLoader:
    """Iterable of batch dicts from a TrainStream or EvalStream through a torch DataLoader.

    `skipped()` -> {reason: count} of bad data seen so far; `skipped_total()` is their sum;
    `take_skipped_records()` -> (records since the last call, how many more were only counted).
    Training loaders have `state_dict()` / `load_state_dict()`, and a new `iter()` continues from the
    last consumed batch. Evaluation loaders have `len()` (the batch count, equal on every rank); each
    `iter()` is a new pass, and the counts add up over passes.
    """

    def __init__(self, stream: TrainStream | EvalStream, workers: int, num_batches: int | None = None,
                 found_at_build: SkipLog | None = None):
        self.stream, self.workers, self.num_batches = stream, workers, num_batches
        found = found_at_build or SkipLog()
        # counts by reason: from the build, finished evaluation passes, a state of another layout; and per worker
        self._earlier_counts: Counter = Counter(found.counts)
        self._worker_counts: dict[int, dict[str, int]] = {}
        self._pending = SkipLog(cap=MAX_PENDING_RECORDS)  # named records until take_skipped_records()
        self._pending.keep(found.records, found.dropped)
        self._positions: dict[int, SlotPosition] = {}  # training: each worker's position after its last consumed batch
        self._next_worker = 0  # training: the logical worker whose batch comes next

    @property
    def slots_per_rank(self) -> int:
        return max(self.workers, 1)

    def skipped(self) -> dict[str, int]:
        total = Counter(self._earlier_counts)
        for counts in self._worker_counts.values():
            total.update(counts)
        return dict(total)

    def skipped_total(self) -> int:
        return sum(self.skipped().values())

    def take_skipped_records(self) -> tuple[list[dict], int]:
        return self._pending.take()

    def _receive(self, report: WorkerReport) -> None:
        self._worker_counts[report.worker] = report.counts
        self._pending.keep(report.records, report.dropped)
        if report.position is not None:
            self._positions[report.worker] = report.position
            self._next_worker = (report.worker + 1) % self.slots_per_rank

    # ------------------------------------------------------------------ position (training)

    def _layout(self) -> dict:
        """What must be equal for a saved position to be continued exactly."""
        s = self.stream
        digest = hashlib.sha256("\n".join(s.shards).encode()).hexdigest()[:16]
        return {"world_size": s.world_size, "rank": s.rank, "workers": self.slots_per_rank, "seed": s.cfg.seed,
                "num_shards": len(s.shards), "shards_sha256": digest}

    def state_dict(self) -> dict:
        """The position after the last consumed batch: per reader slot, its shard, sample, shuffle buffer
        and generator state (see train_stream.SlotPosition); plain types and tensors only."""
        if not isinstance(self.stream, TrainStream):
            raise TypeError("only a training loader has a position to save")
        slots = [self._positions[w].state_dict() if w in self._positions else None
                 for w in range(self.slots_per_rank)]
        return {"format": STATE_FORMAT, "layout": self._layout(), "next_worker": self._next_worker, "slots": slots,
                "start_epoch": self.stream.start_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a state_dict() of the same layout). A state of another layout (world size,
        data.workers, shard list or seed changed) cannot be continued exactly: the stream then starts at the
        first epoch that none of the saved slots had begun, with a warning."""
        if not isinstance(self.stream, TrainStream):
            raise TypeError("only a training loader has a position to load")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data loader state of format {state.get('format')!r}; this version reads {STATE_FORMAT}")
        self.stream.start_epoch = int(state["start_epoch"])
        positions = {w: SlotPosition.from_state(s) for w, s in enumerate(state["slots"]) if s is not None}
        saved = state["layout"]
        if saved == self._layout():
            self._positions = positions
            self._next_worker = int(state["next_worker"])
            self._worker_counts = {w: dict(p.skipped) for w, p in positions.items()}
            return
        reached = [shard_epoch(p.next_shard, saved["rank"] * saved["workers"] + w,
                               saved["world_size"] * saved["workers"], saved["num_shards"])
                   for w, p in positions.items()]
        self.stream.start_epoch = max(reached, default=self.stream.start_epoch - 1) + 1
        self._positions, self._next_worker, self._worker_counts = {}, 0, {}
        for p in positions.values():  # the new slots count from zero on top of these
            self._earlier_counts.update(p.skipped)
        changed = sorted(k for k in saved if saved[k] != self._layout().get(k))
        warnings.warn(f"the data stream was saved with another layout ({', '.join(changed)} changed): it cannot "
                      f"continue exactly and starts at epoch {self.stream.start_epoch} instead", stacklevel=2)

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a training loader is endless and has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if isinstance(self.stream, TrainStream):
            self.stream.starts, self.stream.first_worker = dict(self._positions), self._next_worker
        else:  # a new evaluation pass: its workers count from zero again
            self._earlier_counts = Counter(self.skipped())
            self._worker_counts = {}
        # an evaluation pass draws its workers' base seed from a generator of its own, not torch's global one
        # (which training's dropout uses): validating during training leaves the training's random numbers alone
        generator = None if isinstance(self.stream, TrainStream) else torch.Generator()
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers, generator=generator,
                            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.workers else None)
        produced = 0
        for batch in loader:
            self._receive(batch.pop(STREAM_KEY))
            produced += 1
            yield batch
        if self.num_batches is not None:
            shape = (self.stream.batch_size, *sample_shape(self.stream.cfg))
            for _ in range(self.num_batches - produced):
                yield {"x": torch.zeros(shape), "key": [""] * self.stream.batch_size,
                       "mask": torch.zeros(self.stream.batch_size, dtype=torch.bool)}


def build_train_loader(cfg: DataConfig, batch_size: int, rank: int, world_size: int) -> ShardLoader:
    """Endless loader of {"x": (B,3,H,W) in [-1,1] | (B,T) float32, "key": list[str]} for this rank.

    Reads `cfg.train_shards` (paths, patterns or URLs) with `cfg.workers` DataLoader workers (0: in this
    process). A fresh loader starts the stream of `cfg.seed` from its beginning; `load_state_dict` continues
    a saved one. Bad data is skipped; `loader.skipped()` returns the counts by reason.
    """
    _check_setup(cfg, batch_size, rank, world_size)
    shards = expand_shards(cfg.train_shards)
    return ShardLoader(TrainStream(cfg, shards, batch_size, rank, world_size), cfg.workers)


def build_eval_loader(cfg: DataConfig, shards: str, batch_size: int, rank: int, world_size: int,
                      max_samples: int | None = None) -> ShardLoader:
    """Finite loader of {"x", "key", "mask": (B,) bool, False for padding} over every sample of `shards` once
    (with `max_samples`: over the first max_samples in shard order, or all when there are fewer; the same
    samples at any world size, and the shards' later samples are never read).

    The samples are split between ranks (and their workers) in contiguous ranges; every rank yields
    `len(loader)` batches, the same number on every rank. The split needs every shard's sample count: local
    shards are counted from their tar headers, URL shards by streaming each once (on every rank) at build
    time. Samples that fail to decode are masked out and counted in `loader.skipped()`. Ranks are given
    explicitly; torch.distributed is not needed.
    """
    _check_setup(cfg, batch_size, rank, world_size)
    urls = expand_shards(shards)
    counts, found = count_shards(urls)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1")
        before = itertools.accumulate(counts, initial=0)  # samples in the shards before each one
        counts = [min(n, max(0, max_samples - b)) for n, b in zip(counts, before)]
    stream = EvalStream(cfg, urls, counts, batch_size, rank, world_size)
    return ShardLoader(stream, cfg.workers, stream.batches_per_rank(max(cfg.workers, 1)), found)
