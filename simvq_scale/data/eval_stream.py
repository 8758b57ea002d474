"""The evaluation stream of one rank: every sample of the shard set exactly once across ranks, in equal batch counts.

The samples of the given shards (counted at build time: local files from their tar headers, URLs
by streaming each shard once) are cut into contiguous ranges, one per rank and inside it one per
DataLoader worker. Samples that cannot be read or decoded are yielded as padding (mask False) and
counted; the last batches are padded so that every rank yields the same number of batches. A node
split by shard (webdataset's split_by_node) cannot promise either, which is why the split is by
sample here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate

from simvq_scale.config import DataConfig
from simvq_scale.data.decode import BadSample, decode_sample, sample_shape
from simvq_scale.data.skips import MAX_PENDING_RECORDS, STREAM_KEY, SkipLog, WorkerReport
from simvq_scale.data.tars import count_samples, is_url, iter_samples
from simvq_scale.data.train_stream import worker_slot

SHARD_LEVEL_PROBLEMS = ("truncated_tar", "unreadable_tar")  # counted once, when the shards are counted
URL_COUNT_THREADS = 8  # shards streamed at once while counting a URL shard set (the pipes do the work)


def count_shards(shards: list[str]) -> tuple[list[int], SkipLog]:
    """(samples per shard, the problems met while counting)."""
    logs = [SkipLog(cap=MAX_PENDING_RECORDS) for _ in shards]

    def count(i: int) -> int:
        return count_samples(shards[i], logs[i].callback(shards[i]))

    if any(is_url(s) for s in shards):
        with ThreadPoolExecutor(URL_COUNT_THREADS) as pool:
            counts = list(pool.map(count, range(len(shards))))
    else:
        counts = [count(i) for i in range(len(shards))]
    found = SkipLog(cap=MAX_PENDING_RECORDS)
    for log in logs:
        found.merge(log)
    return counts, found


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

    def _raw(self, start: int, stop: int, log: SkipLog) -> Iterator[dict | None]:
        """Exactly stop - start items: the samples of [start, stop), None where one could not be read."""
        offset = 0
        for url, n in zip(self.shards, self.counts):
            lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
            if lo < hi:
                def problem(reason: str, key: str, detail: str, url: str = url) -> None:
                    if reason not in SHARD_LEVEL_PROBLEMS:
                        log.add(reason, url, key, detail)

                got = 0
                for sample in iter_samples(url, problem, lo, hi):
                    got += 1
                    yield sample
                if got < hi - lo:  # the shard changed or broke since it was counted
                    for _ in range(hi - lo - got):
                        log.add("missing_sample", url, "", f"{url}: has fewer samples than when it was counted")
                    yield from itertools.repeat(None, hi - lo - got)
            offset += n

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        start, stop = self._worker_range(self.rank, worker, workers)
        rng = np.random.default_rng(0)  # unused by evaluation decoding, which is deterministic
        log = SkipLog()
        shape = sample_shape(self.cfg)
        xs, keys, mask = [], [], []
        items = self._raw(start, stop, log)
        for sample in itertools.chain(items, itertools.repeat(None, -(stop - start) % self.batch_size)):
            x = None
            if sample is not None:
                try:
                    x = decode_sample(self.cfg, sample, False, rng)
                except BadSample as e:
                    log.add(e.reason, sample["__url__"], sample["__key__"], e.detail)
            xs.append(torch.zeros(shape) if x is None else x)
            keys.append("" if x is None else sample["__key__"])
            mask.append(x is not None)
            if len(xs) == self.batch_size:
                records, dropped = log.take()
                yield {"x": default_collate(xs), "key": keys, "mask": torch.tensor(mask),
                       STREAM_KEY: WorkerReport(worker, dict(log.counts), records, dropped)}
                xs, keys, mask = [], [], []
