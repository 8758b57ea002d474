"""The speech codec on the real trainer: the demo writes every tag; G and D steps under 2 gloo ranks."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_AUDIO, clean_env

# every test runs launch/train.py (plain python or torchrun): the slow lane
pytestmark = pytest.mark.slow

TRAIN = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "audio_demo.yaml")]
TORCHRUN = Path(sys.executable).with_name("torchrun")

SCALARS = ["loss/total_g", "loss/mel", "loss/feature_matching", "loss/g_adv", "loss/d", "loss/commit",
           "codebook/utilization", "codebook/perplexity", "codebook/dead_codes", "W/rank", "W/fro_norm",
           "opt/lr_g", "opt/grad_norm_g", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_frac",
           "perf/max_mem_gib"]


def overrides(demo_data, out_dir, *more):
    return [*TINY_AUDIO, f"data.train_shards={demo_data['audio_train']}",
            f"data.val_shards={demo_data['audio_val']}", f"train.out_dir={out_dir}", *more]


def test_demo_run_writes_every_audio_tag(demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cmd = TRAIN + ["--set", *overrides(demo_data, out, "train.steps=2", "train.log_every=1")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                           "audio": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
    assert "W/singular_values" in tags["histograms"]
    assert "recon/mel" in tags["images"]
    assert {"recon/audio_0", "recon/audio_1"} <= set(tags["audio"])
    clip = acc.Audio("recon/audio_0")[-1]
    # input, 0.25 s of silence, reconstruction (as long as the input) in one player
    assert clip.sample_rate == 24000 and clip.length_frames == 6000 + 6000 + 6000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/mel"]) and r["loss/d"] > 0 and r["loss/feature_matching"] > 0 for r in rows)


def test_dry_run_prints_the_bitrate(demo_data, tmp_path):
    # --dry-run checks that the shards exist, so it gets the demo's
    done = subprocess.run(TRAIN + ["--set", *overrides(demo_data, tmp_path), "quantizer.codebook_size=4096",
                                   "data.segment_seconds=1.0", "--dry-run"],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tokens_per_sample"] == 75 and summary["tokens_per_second"] == 75
    assert summary["bitrate_bps"] == 75 * 12  # the paper's 0.9 kbps at 4,096 codes


def test_one_generator_and_discriminator_step_on_two_gloo_ranks(demo_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--standalone", *TRAIN[1:],
           "--set", *overrides(demo_data, out, "train.steps=1", "train.log_every=1")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1/1" in done.stdout
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss/total_g", "loss/mel", "loss/g_adv", "loss/feature_matching", "loss/d", "loss/commit"):
        assert math.isfinite(row[tag]), (tag, row[tag])
    assert row["loss/d"] > 0 and row["train/nonfinite_losses"] == 0
    assert (out / "ckpt" / "generator").is_dir() and (out / "ckpt" / "discriminator").is_dir()
