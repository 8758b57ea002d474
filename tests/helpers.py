"""What several test modules share: the checkout's paths, the tiny run settings, the trainer built in a process
or run as a user runs it (a subprocess of launch/train.py or tools/*.py, with its one-line errors), reading back
what a run wrote, tiny untrained exports, and the crafted .pt files that the refusal tests plant. The P-process
harness is tests/dist_utils.py.

    done = train(out_dir, *tiny_overrides(demo_data, out_dir), extra=["--resume", "auto"])
    message = one_error(done, 5)          # the one `error:` line, after checking the exit code
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # real photos and speech, beside the checkout (tests skip without)
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "image_demo.yaml")]

# a tiny image model: 32 px crops, one downsampling: 16x16 tokens
TINY_IMAGE = ["data.image_size=32", "data.workers=0", "data.shuffle_buffer=50",
              "model.image.channels=32", "model.image.channel_mult=[1,2]", "model.image.num_res_blocks=1",
              "model.discriminator.layers=2", "model.discriminator.channels=32",
              "quantizer.codebook_size=256", "quantizer.dim=32", "quantizer.usage_window_tokens=1024",
              "train.global_batch=4", "loss.disc_start=0", "optim.warmup_steps=2"]

# the audio demo config, smaller still: 0.25 s segments, adversarial terms from the first step
TINY_AUDIO = ["data.segment_seconds=0.25", "data.workers=0", "data.shuffle_buffer=20", "train.global_batch=4",
              "quantizer.codebook_size=256", "quantizer.usage_window_tokens=1024", "loss.disc_start=0",
              "optim.warmup_steps=2"]

# the quantizer comparison's tiny image model (32 px, one downsampling: 16x16 tokens of 2x2 pixels), two log lines
# per run; and its evaluation without the networks that need downloaded weights
TINY_COMPARISON = ["data.image_size=32", "data.workers=0", "data.shuffle_buffer=50", "model.image.channels=32",
                   "model.image.channel_mult=[1,2]", "model.image.num_res_blocks=1", "model.discriminator.layers=2",
                   "model.discriminator.channels=32", "quantizer.dim=16", "quantizer.usage_window_tokens=1024",
                   "train.global_batch=4", "train.log_every=1", "train.ckpt_every=2", "optim.warmup_steps=1"]
OFFLINE_EVAL = ["--skip", "lpips_vgg,lpips_alex,rfid", "--max-samples", "8", "--eval-batch-size", "8",
                "--eval-workers", "0"]

# tiny untrained models (no training needed: the export format is all the tools read)
TINY_EXPORT = {
    "image": ["data.image_size=32", "model.image.channels=32", "model.image.channel_mult=[1,2]",
              "quantizer.codebook_size=256", "quantizer.dim=8", "data.workers=0"],
    "audio": ["quantizer.codebook_size=256", "quantizer.dim=8", "data.workers=0"],
}


def tiny_overrides(demo_data, out_dir, *more):
    return TINY_IMAGE + [f"data.train_shards={demo_data['image_train']}", f"data.val_shards={demo_data['image_val']}",
                         f"train.out_dir={out_dir}", *more]


def make_trainer(overrides, resume=None):
    from simvq_scale import distributed
    from simvq_scale.config import load_config
    from simvq_scale.train.trainer import Trainer

    device = distributed.init_distributed()
    cfg = load_config(ROOT / "configs" / "image_demo.yaml", overrides).validate(distributed.world_size())
    return Trainer(cfg, device, resume=resume)


def fit_worker(rank, world_size, runs):
    for overrides, resume in runs:
        make_trainer(overrides, resume).fit()


def losses_by_step(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: (row["loss/total_g"], row["loss/d"]) for row in rows}


def read_tensorboard(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc.Tags()


def clean_env() -> dict[str, str]:
    """This environment without a launcher's rank variables: launch/train.py then runs as one process."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}


def train(out: Path, *overrides: str, extra: tuple | list = ()) -> subprocess.CompletedProcess:
    cmd = TRAIN + ["--set", *overrides, f"train.out_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)


def one_error(done: subprocess.CompletedProcess, code: int) -> str:
    """The run's single `error:` line, after checking its exit code and that it printed no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """tools/`name` run to success (its output returned)."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_export(modality: str, out_dir: Path, shard_group: str = "none") -> Path:
    """A run dir holding generator_ema.pt of a tiny untrained model, in Trainer.export's format."""
    from simvq_scale.config import load_config
    from simvq_scale.inference import EXPORT_NAME, build_from_config, export_generator

    cfg = load_config(ROOT / "configs" / f"{modality}_demo.yaml",
                      TINY_EXPORT[modality] + [f"quantizer.shard.group={shard_group}"])
    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_generator(build_from_config(cfg), cfg, 7, out_dir / EXPORT_NAME)
    return out_dir


class CreatesMarker:
    """Unpickled by the full unpickler, this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Add the payload to one of our own .pt files (trusted here: the test wrote it)."""
    content = torch.load(path, map_location="cpu", weights_only=False)
    content["payload"] = CreatesMarker(marker)
    torch.save(content, path)
