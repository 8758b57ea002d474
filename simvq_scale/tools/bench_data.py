"""Data loading throughput: shard reader vs folder baselines over the same files, in one run.

    python tools/bench_data.py --images /work/shared/data/photos/train --audio /work/shared/data/speech/train

Images: 128 px training crops; the shard reader (build_train_loader) against a torchvision
ImageFolder + DataLoader with the equivalent transform (shorter side to 128, random 128 crop, to
[-1, 1]). Audio: seconds of 24 kHz audio, 1 s random segments; the shard reader against a DataLoader
over the audio files read with soundfile (seeking the same segment). Tar reading alone: raw samples of
the audio shards through this project's tar walker (simvq_scale.data.tars) and through webdataset's
tarfile_samples.

Each measurement is timed after its first batch (worker start-up excluded), for each --workers value
(0 = in the main process, with one torch thread as in a DataLoader worker: on a busy machine idle
OpenMP threads spinning would otherwise be counted), --repeats times, the loaders taking turns so that a shared machine's load
falls on all of them. Two rates: per wall-clock second, and per CPU-second (the CPU time of this
process and its DataLoader workers, read from /proc; "per core", and much steadier than wall-clock
time on a busy machine). The table gives medians and [min-max]; a JSON line follows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from simvq_scale.config import DataConfig
from simvq_scale.data import build_train_loader, expand_shards, shard_audio, shard_images
from simvq_scale.data.audio_sources import AUDIO_SUFFIXES
from simvq_scale.data.decode import to_mono_at_rate
from simvq_scale.data.shards import shard_pattern, walk_sorted
from simvq_scale.data.tars import iter_samples

SHARED = Path("../shared/data")  # this project's development data, beside the checkout it is run from
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BASELINE = {"image shards": "ImageFolder", "audio shards": "audio folder", "tar walker": "wds tarfile_samples"}


class AudioFolder(Dataset):
    """Baseline: one random segment per audio file, read with soundfile, mono, at the target rate."""

    def __init__(self, root: str, rate: int, seconds: float):
        self.files = list(walk_sorted(root, AUDIO_SUFFIXES))
        self.rate, self.length = rate, round(seconds * rate)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with sf.SoundFile(self.files[i]) as f:
            need = int(np.ceil(self.length * f.samplerate / self.rate))
            f.seek(int(np.random.randint(0, max(f.frames - need, 0) + 1)))
            audio = to_mono_at_rate(f.read(need, dtype="float32", always_2d=True), f.samplerate, self.rate)
        wave = torch.zeros(self.length)
        wave[: len(audio)] = torch.from_numpy(audio[: self.length])
        return wave


def folder_loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    """A shuffling DataLoader whose workers live across epochs (on these small folders an epoch is a few
    batches; a restart per epoch would measure worker start-up, not reading)."""
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def image_folder(root: str, size: int) -> Dataset:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])
    return datasets.ImageFolder(root, transform)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its child processes (the DataLoader workers): the live
    ones from /proc, the finished ones from getrusage."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + children.ru_utime + children.ru_stime
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == me:  # fields after the name: state, ppid, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def time_batches(make_iter, batches: int, count_of) -> tuple[float, float]:
    """(items per wall second, items per CPU-second) over `batches` batches after the first; an iterator that
    ends (one epoch of a folder) is started again."""
    it = make_iter()
    next(it)
    done, items = 0, 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            it = make_iter()
            continue
        done += 1
        items += count_of(batch)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    del it
    return items / wall, items / max(cpu, 1e-9)


def raw_tar_samples(shards: list[str], walker: str, batch: int):
    """Batches (lists) of raw undecoded samples, endlessly, through our tar walker or webdataset's."""
    def samples():
        while True:
            if walker == "ours":
                for url in shards:
                    yield from iter_samples(url)
            else:
                yield from wds.tarfile_samples([{"url": url} for url in shards])

    stream = samples()
    while True:
        yield [next(stream) for _ in range(batch)]


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(SHARED / "photos" / "train"), help="ImageFolder tree")
    parser.add_argument("--audio", default=str(SHARED / "speech" / "train"), help="folder of audio files")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement (default 40)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per loader and worker count (default 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--segment-seconds", type=float, default=1.0)
    parser.add_argument("--work", default=None, help="folder for the shards (default: a temporary folder)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # what every DataLoader worker runs with
    for path in (args.images, args.audio):
        if not os.path.isdir(path):
            print(f"error: {path} is not a folder (pass --images / --audio)", file=sys.stderr)
            return 2
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        image_set = shard_images(args.images, work, split="bench", shard_size=32, prefix="images")
        audio_set = shard_audio(args.audio, work, split=None, sample_rate=24000, shard_size=64, prefix="audio")
        image_cfg = DataConfig(modality="image", train_shards=shard_pattern(image_set, work),
                               image_size=args.image_size, shuffle_buffer=64)
        audio_cfg = DataConfig(modality="audio", train_shards=shard_pattern(audio_set, work),
                               segment_seconds=args.segment_seconds, shuffle_buffer=64)
        audio_shards = expand_shards(audio_cfg.train_shards)
        kinds = ("image shards", "ImageFolder", "audio shards", "audio folder")
        plan = [(kind, w) for _ in range(args.repeats) for w in workers for kind in kinds]
        plan += [(kind, 0) for _ in range(args.repeats) for kind in ("tar walker", "wds tarfile_samples")]
        for kind, w in tqdm(plan, desc="bench", unit="run"):
            if kind == "image shards":
                cfg = DataConfig(**{**image_cfg.__dict__, "workers": w})
                rates = time_batches(lambda: iter(build_train_loader(cfg, args.batch_size, 0, 1)), args.batches,
                                     lambda b: b["x"].shape[0])
            elif kind == "ImageFolder":
                loader = folder_loader(image_folder(args.images, args.image_size), args.batch_size, w)
                rates = time_batches(lambda: iter(loader), args.batches, lambda b: b[0].shape[0])
            elif kind == "audio shards":
                cfg = DataConfig(**{**audio_cfg.__dict__, "workers": w})
                rates = time_batches(lambda: iter(build_train_loader(cfg, args.batch_size, 0, 1)), args.batches,
                                     lambda b: b["x"].shape[0] * args.segment_seconds)
            elif kind == "audio folder":
                loader = folder_loader(AudioFolder(args.audio, 24000, args.segment_seconds), args.batch_size, w)
                rates = time_batches(lambda: iter(loader), args.batches, lambda b: b.shape[0] * args.segment_seconds)
            else:
                walker = "ours" if kind == "tar walker" else "webdataset"
                rates = time_batches(lambda: raw_tar_samples(audio_shards, walker, args.batch_size), args.batches,
                                     len)
            runs.setdefault((kind, w), []).append(rates)
            loader = None  # a folder loader's persistent workers end here, not during the next measurement
    rows = []
    for (kind, w), measured in runs.items():
        unit = "img/s" if kind.startswith("image") or kind == "ImageFolder" else \
            "audio s/s" if kind.startswith("audio") else "samples/s"
        rows.append({"loader": kind, "workers": w, "unit": unit, "repeats": len(measured),
                     "per_wall_s": summarize([m[0] for m in measured]),
                     "per_cpu_s": summarize([m[1] for m in measured])})
    by_key = {(r["loader"], r["workers"]): r for r in rows}
    for r in rows:
        base = by_key.get((BASELINE.get(r["loader"], ""), r["workers"]))
        if base is not None:
            r["per_cpu_s_vs_baseline"] = round(r["per_cpu_s"]["median"] / base["per_cpu_s"]["median"], 2)

    def cell(s: dict) -> str:
        return f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]"

    print(f"\n{'loader':<20} {'workers':>7} {'per wall-clock s':>22} {'per CPU-second':>22} {'vs base':>8}  unit   "
          f"(cpu cores here: {os.cpu_count()}; {image_set['total']} images, {audio_set['total']} clips; "
          f"median [min-max] of {args.repeats})")
    for r in rows:
        ratio = f"{r['per_cpu_s_vs_baseline']:.2f}x" if "per_cpu_s_vs_baseline" in r else ""
        print(f"{r['loader']:<20} {r['workers']:>7} {cell(r['per_wall_s']):>22} {cell(r['per_cpu_s']):>22} "
              f"{ratio:>8}  {r['unit']}")
    print(json.dumps({"bench": "data", "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
                      "image_size": args.image_size, "segment_seconds": args.segment_seconds,
                      "batches": args.batches, "repeats": args.repeats, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
