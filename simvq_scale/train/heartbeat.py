"""A heartbeat between ranks: a rank that falls silent is named, and every rank stops, long before the
collective timeout would end the hang.

A frozen rank (a node lost without a TCP reset, a process stopped by the kernel) leaves every other
rank blocked inside its next collective for `train.collective_timeout_s`, where the main thread can
notice nothing. So each rank runs a daemon thread that
  * writes a beat (a counter, the training step, host and pid) to the rendezvous store every
    `interval` seconds; it keeps beating while its own main thread waits in a collective;
  * watches one other rank, the next one in a ring (rank r watches r + 1), and declares it lost when
    its beat has not changed for `train.heartbeat_timeout_s` seconds on the watcher's own clock;
  * reads one shared stop key: the first rank that sees a loss (or that stops on an error of its
    own) writes it, and every rank then prints it and ends its process with exit code 7
    (os._exit: the main thread may be stuck in a collective and cannot be unwound).
A ring keeps the store's load at a few requests per rank and interval; a lost node (consecutive
ranks) is still seen, by the rank in front of it.

The store is the one the process group met through (MASTER_ADDR:MASTER_PORT: rank 0's, or torchrun's
agent's), reached through a connection of our own. A store call to a frozen host can block for good
(measured with torch 2.11: check/get/compare_set ignore the client timeout against a SIGSTOPped
server), so the store is only talked to from one thread and judged from a second one that does no
I/O: a store that has not answered for the whole timeout is reported as lost, naming its address.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

import torch.distributed as dist

EXIT_RANK_LOST = 7  # the process exit code of every rank that stops because another rank was lost
DONE = "done"  # the beat of a rank that finished normally: it is no longer watched


class Heartbeat:
    """Start with Heartbeat.start (collective); end with finish() after a normal run or fail(message)
    when this rank stops on an error the others do not share."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, world_size: int, timeout_s: float,
                 collective_timeout_s: float):
        self.store, self.prefix, self.rank, self.world_size = store, prefix, rank, world_size
        self.timeout_s, self.collective_timeout_s = timeout_s, collective_timeout_s
        self.interval_s = min(10.0, timeout_s / 5)
        self.step_source: Callable[[], int | None] = lambda: None  # the caller points this at its step
        self._stopped = threading.Event()
        self._last_answer = time.monotonic()
        self._beats = 0
        self._threads = [threading.Thread(target=self._talk, name="simvq-heartbeat", daemon=True),
                         threading.Thread(target=self._judge_store, name="simvq-heartbeat-store", daemon=True)]

    @classmethod
    def start(cls, timeout_s: float, collective_timeout_s: float) -> "Heartbeat | None":
        """Every rank calls this after the process group exists; None when there is nothing to watch."""
        world_size = dist.get_world_size()
        if timeout_s <= 0 or world_size == 1:
            return None
        if not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():  # a group made without env:// rendezvous
            if dist.get_rank() == 0:
                print("heartbeat off: MASTER_ADDR/MASTER_PORT are not set, so the rendezvous store is unknown; "
                      "a frozen rank is only caught by train.collective_timeout_s", flush=True)
            return None
        # a name of this run's own, so that a store that outlives a restart (torchrun's agent) holds no old beats
        run_id = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        heartbeat = cls(store, f"simvq_heartbeat/{run_id[0]}", dist.get_rank(), world_size, timeout_s,
                        collective_timeout_s)
        heartbeat._beat()
        for thread in heartbeat._threads:
            thread.start()
        return heartbeat

    def finish(self) -> None:
        """A normal end: stop beating and tell the watcher not to wait for this rank any more."""
        self._stop_threads()
        self._last_word(lambda: self.store.set(self._key(self.rank), DONE))

    def fail(self, message: str) -> None:
        """This rank stops on an error of its own: every other rank stops too, with this message."""
        self._stop_threads()
        stop = f"rank {self.rank} ({socket.gethostname()}) stopped: {message}"
        self._last_word(lambda: self.store.compare_set(self._stop_key, "", stop))

    # ------------------------------------------------------------------ the threads

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/rank{rank}"

    @property
    def _stop_key(self) -> str:
        return f"{self.prefix}/stop"

    def _stop_threads(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval_s)  # a call into a frozen store may never return

    def _last_word(self, write: Callable[[], object]) -> None:
        """One last store write, given up after two intervals (the store's host may be frozen)."""
        def attempt() -> None:
            try:
                write()
            except Exception:  # noqa: BLE001 - best effort: the store may be gone with its host
                pass

        writer = threading.Thread(target=attempt, daemon=True)
        writer.start()
        writer.join(timeout=2 * self.interval_s)

    def _beat(self) -> None:
        self._beats += 1
        beat = {"beat": self._beats, "step": self.step_source(), "host": socket.gethostname(), "pid": os.getpid()}
        self.store.set(self._key(self.rank), json.dumps(beat))

    def _talk(self) -> None:
        """Beat, read the stop key and the watched rank's beat; declare it lost when it stops changing."""
        watched = (self.rank + 1) % self.world_size
        last_seen, seen_since = None, time.monotonic()
        while not self._stopped.wait(self.interval_s):
            try:
                self._beat()
                if self.store.check([self._stop_key]):
                    self._exit(self.store.get(self._stop_key).decode())
                beat = self.store.get(self._key(watched)).decode() if self.store.check([self._key(watched)]) else None
            except Exception:  # noqa: BLE001 - a store that fails is judged by time, in _judge_store
                continue
            now = self._last_answer = time.monotonic()
            if beat == DONE:
                continue
            if beat != last_seen:
                last_seen, seen_since = beat, now
            elif now - seen_since > self.timeout_s:
                message = self._lost_message(watched, last_seen, now - seen_since)
                self._last_word(lambda: self.store.compare_set(self._stop_key, "", message))
                self._exit(message)

    def _judge_store(self) -> None:
        """No I/O here: end the process when the talking thread has had no answer for the whole timeout."""
        while not self._stopped.wait(self.interval_s):
            silent_s = time.monotonic() - self._last_answer
            if silent_s > self.timeout_s:
                self._exit(self._store_lost_message(silent_s))

    def _lost_message(self, rank: int, beat: str | None, silent_s: float) -> str:
        info = json.loads(beat) if beat else {}
        step = f", last at step {info['step']}" if info.get("step") is not None else ""
        where = f" (host {info['host']}, pid {info['pid']}{step})" if info else ""
        return (f"rank {rank}{where} has sent no heartbeat for {silent_s:.0f} s "
                f"(train.heartbeat_timeout_s={self.timeout_s:g}): it is frozen, dead or cut off. Every rank "
                f"stops now instead of waiting out train.collective_timeout_s={self.collective_timeout_s:g} "
                f"(seen by rank {self.rank}); restart with --resume auto once its node is healthy")

    def _store_lost_message(self, silent_s: float) -> str:
        return (f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                f"(hosted by rank 0 or the launcher) has not answered for {silent_s:.0f} s "
                f"(train.heartbeat_timeout_s={self.timeout_s:g}): rank 0 or its node is frozen, dead or cut off "
                f"(seen by rank {self.rank}); restart with --resume auto once it is healthy")

    def _exit(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_RANK_LOST)
