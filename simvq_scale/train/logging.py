"""Where figures go: TensorBoard + metrics.jsonl + console on rank 0, nothing elsewhere.

Callers reduce across ranks first (every rank takes part in the collective) and then hand the finished
numbers to the logger; non-logging ranks hold a NoOpLogger so the training code never branches on the
rank around a log call.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"  # in train.out_dir: one JSON line per log step
TENSORBOARD_DIR = "tb"  # in train.out_dir: the TensorBoard event files


class NoOpLogger:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        pass

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def audio(self, step: int, tag: str, waveform: torch.Tensor, sample_rate: int) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def layout(self, layout: dict[str, dict[str, list[str]]]) -> None:
        pass

    def hparams(self, hparams: dict[str, float | int | str | bool], metric_tags: list[str]) -> None:
        pass

    def console(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(NoOpLogger):
    """Console lines only: the logging rank before its run folder exists (start-up, --dry-run)."""

    def console(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)


class RunLogger(ConsoleLogger):
    """TensorBoard events under out_dir/tb, one JSON line per log step in out_dir/metrics.jsonl."""

    def __init__(self, out_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out_dir)
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        self.jsonl = (out / METRICS_FILE).open("a", buffering=1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        record = {"step": step, "time": time.time(), **{k: _json_number(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        self.writer.add_image(tag, image.detach().float().cpu().clamp(0, 1), step)

    def audio(self, step: int, tag: str, waveform: torch.Tensor, sample_rate: int) -> None:
        self.writer.add_audio(tag, waveform.detach().float().cpu().clamp(-1, 1), step, sample_rate=sample_rate)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def layout(self, layout: dict[str, dict[str, list[str]]]) -> None:
        """TensorBoard's custom-scalars dashboard: category -> chart title -> the tags drawn in it (each as an
        anchored regular expression: the dashboard matches a chart's entries as regexes from the tag's start,
        so a bare "W/rank" would draw W/rank_fp32 as well)."""
        self.writer.add_custom_scalars({category: {title: ["Multiline", [f"^{re.escape(t)}$" for t in tags]]
                                                   for title, tags in charts.items()}
                                        for category, charts in layout.items()})

    def hparams(self, hparams: dict[str, float | int | str | bool], metric_tags: list[str]) -> None:
        """The run's hyper-parameters for the HParams dashboard; its metrics are the scalars `metric_tags`
        that this run writes (their latest values are what the dashboard compares across runs)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, {tag: 0.0 for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Stopwatch:
    """Seconds since the last lap: the start-up lines say how long each phase took."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class Ticker:
    """While its block runs, `say(f"{what} ({seconds} s so far)")` every `every` seconds from a helper thread:
    the first compiled step runs for minutes without a line of its own, which reads as a hang."""

    def __init__(self, say, what: str, every: float = 30.0):
        self.say, self.what, self.every = say, what, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        start = time.perf_counter()
        while not self._done.wait(self.every):
            self.say(f"{self.what} ({time.perf_counter() - start:.0f} s so far)")

    def __enter__(self) -> "Ticker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
