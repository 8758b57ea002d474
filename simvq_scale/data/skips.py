"""Bad data, counted and named: what a reader skipped, by reason, and which shard and key it was.

A reader (one per DataLoader worker) keeps counts by reason and the records of the problems seen
since its last batch (`SkipLog`); the records travel to the main process with that batch, so naming
costs no extra round trip. The loader keeps at most MAX_PENDING_RECORDS of them until they are taken
and counts the rest. At log steps `SkippedSampleReport.publish` gathers every rank's records (one
collective, only when the global count grew) and rank 0 appends them to out_dir/skipped_samples.jsonl
and prints one console line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORDS_PER_BATCH = 64  # records one worker attaches to one batch; beyond it they are counted only
MAX_PENDING_RECORDS = 1000  # records a loader holds between two takes (log steps)
CONSOLE_RECORDS = 5  # records named in the console line (all of them go to the JSON-lines file)
STREAM_KEY = "_stream"  # the batch field that carries a WorkerReport from a worker to the loader


@dataclass
class WorkerReport:
    """What a worker sends with each batch: its cumulative counts, the records since its last batch, and
    (training) its position after the batch, a train_stream.SlotPosition."""

    worker: int  # logical worker
    counts: dict[str, int]
    records: list[dict]
    dropped: int
    position: Any = None


class SkipLog:
    """Counts problems by reason; keeps the records of the ones seen since the last `take()` (up to a cap)."""

    def __init__(self, counts: dict[str, int] | None = None, cap: int = RECORDS_PER_BATCH):
        self.counts: Counter = Counter(counts or {})
        self.cap = cap
        self.records: list[dict] = []
        self.dropped = 0

    def add(self, reason: str, url: str, key: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.records) < self.cap:
            self.records.append({"reason": reason, "url": url, "key": key, "detail": detail})
        else:
            self.dropped += 1

    def keep(self, records: list[dict], dropped: int = 0) -> None:
        """Keep what fits of another reader's `records` under the cap; count the rest as dropped."""
        room = max(0, self.cap - len(self.records))
        self.records += records[:room]
        self.dropped += dropped + max(0, len(records) - room)

    def merge(self, other: SkipLog) -> None:
        """Add another log's counts and records."""
        self.counts.update(other.counts)
        self.keep(other.records, other.dropped)

    def callback(self, url: str) -> Callable[[str, str, str], None]:
        """An `on_problem(reason, key, detail)` for the readers in tars.py, naming `url`."""
        return lambda reason, key, detail: self.add(reason, url, key, detail)

    def take(self) -> tuple[list[dict], int]:
        """(records since the last take, how many more were counted but not kept)."""
        records, dropped = self.records, self.dropped
        self.records, self.dropped = [], 0
        return records, dropped


class SkippedSampleReport:
    """Names skipped samples at log steps: every rank's new records -> out_dir/skipped_samples.jsonl + a console line.

    Call `publish` on every rank at every log step with the global skipped count (already reduced):
    the gather runs only when that count grew, which every rank sees alike.
    """

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = Path(path), is_main
        self.published_total = 0.0

    def publish(self, step: int, loader, global_total: float, console: Callable[[str], None]) -> None:
        if global_total <= self.published_total:
            return
        from simvq_scale import distributed

        self.published_total = global_total
        records, dropped = loader.take_skipped_records()
        everyone = distributed.gather_objects({"rank": distributed.rank(), "records": records, "dropped": dropped})
        if not self.is_main:
            return
        named = [{"step": step, "rank": r["rank"], **record} for r in everyone for record in r["records"]]
        unnamed = [{"step": step, "rank": r["rank"], "reason": "not_recorded", "count": r["dropped"]}
                   for r in everyone if r["dropped"]]
        if not named and not unnamed:  # e.g. the first log step after a resume: counts restored, nothing new
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in named + unnamed)
        shown = "; ".join(f"{r['url']} {r['key'] or '(whole shard)'}: {r['reason']}" for r in named[:CONSOLE_RECORDS])
        more = max(0, len(named) - CONSOLE_RECORDS) + sum(r["count"] for r in unnamed)
        console(f"data: skipped {shown or 'samples'}" + (f" and {more} more" if more > 0 else "")
                + f" (total {int(global_total)} so far; listed in {self.path})")
