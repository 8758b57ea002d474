"""Data loading throughput: shard reader vs folder baselines over the same files, in one run.

    python tools/bench_data.py --images /work/shared/data/photos/train --audio /work/shared/data/speech/train

Images: 128 px training crops per second; the shard reader (build_train_loader) against a
torchvision ImageFolder + DataLoader with the equivalent transform (shorter side to 128, random
128 crop, to [-1, 1]). Audio: seconds of 24 kHz audio per second, 1 s random segments; the shard
reader against a DataLoader over the audio files read with soundfile (seeking the same segment).
Both are timed after their first batch (worker start-up excluded), for each --workers value
(0 = in the main process, counted as one core). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from simvq_scale.config import DataConfig
from simvq_scale.data import build_train_loader, shard_audio, shard_images
from simvq_scale.data.audio_sources import AUDIO_SUFFIXES
from simvq_scale.data.decode import to_mono_at_rate
from simvq_scale.data.shards import shard_pattern, walk_sorted

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def image_folder_loader(root: str, size: int, batch: int, workers: int) -> DataLoader:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])
    return DataLoader(datasets.ImageFolder(root, transform), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True)


def time_batches(make_iter, batches: int, x_of) -> float:
    """Samples per second over `batches` batches after the first; restarts the iterator at the end of an epoch."""
    it = make_iter()
    next(it)
    done, start = 0, time.perf_counter()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            it = make_iter()
            continue
        done += 1
        count = x_of(batch).shape[0]
    elapsed = time.perf_counter() - start
    return batches * count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(SHARED / "photos" / "train"), help="ImageFolder tree")
    parser.add_argument("--audio", default=str(SHARED / "speech" / "train"), help="folder of audio files")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement (default 20)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--segment-seconds", type=float, default=1.0)
    parser.add_argument("--work", default=None, help="folder for the shards (default: a temporary folder)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    for path in (args.images, args.audio):
        if not os.path.isdir(path):
            print(f"error: {path} is not a folder (pass --images / --audio)", file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        image_set = shard_images(args.images, work, split="bench", shard_size=32, prefix="images")
        audio_set = shard_audio(args.audio, work, split=None, sample_rate=24000, shard_size=64, prefix="audio")
        image_cfg = DataConfig(modality="image", train_shards=shard_pattern(image_set, work),
                               image_size=args.image_size, shuffle_buffer=64)
        audio_cfg = DataConfig(modality="audio", train_shards=shard_pattern(audio_set, work),
                               segment_seconds=args.segment_seconds, shuffle_buffer=64)
        plan = [(w, kind) for w in workers for kind in ("image shards", "ImageFolder", "audio shards", "audio folder")]
        for w, kind in tqdm(plan, desc="bench", unit="run"):
            if kind == "image shards":
                cfg = DataConfig(**{**image_cfg.__dict__, "workers": w})
                rate = time_batches(lambda: iter(build_train_loader(cfg, args.batch_size, 0, 1)),
                                    args.batches, lambda b: b["x"])
            elif kind == "ImageFolder":
                rate = time_batches(lambda: iter(image_folder_loader(args.images, args.image_size,
                                                                     args.batch_size, w)), args.batches, lambda b: b[0])
            elif kind == "audio shards":
                cfg = DataConfig(**{**audio_cfg.__dict__, "workers": w})
                rate = args.segment_seconds * time_batches(
                    lambda: iter(build_train_loader(cfg, args.batch_size, 0, 1)), args.batches, lambda b: b["x"])
            else:
                dataset = AudioFolder(args.audio, 24000, args.segment_seconds)
                rate = args.segment_seconds * time_batches(
                    lambda: iter(DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=w,
                                            drop_last=True)), args.batches, lambda b: b)
            unit = "img/s" if kind.startswith("image") or kind == "ImageFolder" else "audio s/s"
            rows.append({"loader": kind, "workers": w, "unit": unit, "rate": round(rate, 1),
                         "rate_per_core": round(rate / max(w, 1), 1)})
    print(f"\n{'loader':<14} {'workers':>7} {'rate':>10} {'per core':>10}  unit   "
          f"(cpu cores here: {os.cpu_count()}; {image_set['total']} images, {audio_set['total']} clips)")
    for r in rows:
        print(f"{r['loader']:<14} {r['workers']:>7} {r['rate']:>10.1f} {r['rate_per_core']:>10.1f}  {r['unit']}")
    print(json.dumps({"bench": "data", "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
                      "image_size": args.image_size, "segment_seconds": args.segment_seconds, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
