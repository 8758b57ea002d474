"""The trainer's data stream: its order does not depend on checkpoints, and skipped samples are named in the run folder."""

import json
from pathlib import Path

import pytest
import webdataset as wds

from tests.dist_utils import run_distributed
from tests.helpers import losses_by_step, make_trainer, tiny_overrides

# the runs train on spawned gloo ranks: the slow lane
pytestmark = pytest.mark.slow

CORRUPT_KEYS = ["bad/0", "bad/1", "bad/2"]


def _recorded(batches, keys):
    for batch in batches:
        keys.append(list(batch["key"]))
        yield batch


class RecordingLoader:
    """The trainer's loader, noting the keys of every batch the trainer takes from it."""

    def __init__(self, loader, keys):
        self.loader, self.keys = loader, keys

    def __iter__(self):
        return _recorded(iter(self.loader), self.keys)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def consumed_keys_worker(rank, world_size, runs):
    """Fit each (overrides, resume) in turn; the keys of every training batch this rank consumed, in order."""
    keys = []
    for overrides, resume in runs:
        trainer = make_trainer(overrides, resume)
        trainer.loader = RecordingLoader(trainer.loader, keys)
        trainer.fit()
    return keys


def test_data_order_does_not_depend_on_ckpt_every_and_skips_are_named(demo_data, tmp_path, capfd):
    corrupt = tmp_path / "corrupt-000000.tar"
    with open(corrupt, "wb") as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        for key in CORRUPT_KEYS:
            writer.write({"__key__": key, "jpg": b"\xff\xd8 not a jpeg", "cls": b"0"})
        writer.close()
    good = demo_data["image_train"].replace("{000000..000008}", "000000")
    # two shards for two ranks: one rank starts on the corrupt shard; a small shuffle buffer draws it early
    common = [f"data.train_shards={good}::{corrupt}", "data.shuffle_buffer=4", "train.log_every=1", "train.steps=4"]
    every_step = tiny_overrides(demo_data, tmp_path / "every_step", *common, "train.ckpt_every=1")
    first_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.ckpt_every=2", "train.steps=2")
    second_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.ckpt_every=4")
    runs = [[(every_step, None)], [(first_half, None), (second_half, "auto")]]
    (a0, a1), (b0, b1) = (run_distributed(consumed_keys_worker, 2, r, timeout_s=600) for r in runs)

    # a save at every step vs a save at step 2, a resume and a save at the end: the same batches on each rank
    assert len(a0) == len(a1) == 4 and all(len(keys) == 2 for keys in a0 + a1)
    assert (a0, a1) == (b0, b1)
    assert a0 != a1  # the ranks read different samples
    a, b = losses_by_step(tmp_path / "every_step"), losses_by_step(tmp_path / "resumed")
    for step in (1, 2, 3, 4):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)

    # the corrupt samples are named (shard, key, reason) in the run folder and on the console
    console = capfd.readouterr().out
    named = [json.loads(line) for line in (tmp_path / "every_step" / "skipped_samples.jsonl").read_text().splitlines()]
    assert named and {r["key"] for r in named} <= set(CORRUPT_KEYS)
    assert all(r["url"] == str(corrupt) and r["reason"] == "undecodable_image" and r["step"] >= 1 for r in named)
    assert any(line.startswith("data: skipped ") and str(corrupt) in line for line in console.splitlines())
    metrics = [json.loads(line) for line in (tmp_path / "every_step" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["data/skipped_samples"] == len(named)  # every counted skip was named
    assert Path(tmp_path / "resumed" / "skipped_samples.jsonl").exists()
