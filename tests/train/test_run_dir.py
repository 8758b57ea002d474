"""Run folders protect themselves: a lock, no fresh start over a run unless --overwrite, a resume whose config
is checked against the checkpoint before anything is written, clean-up by step number, leftovers of a killed
run tidied. Real runs of launch/train.py on one plain-python process (exit code 5 for these errors)."""

import fcntl
import hashlib
import json
import shutil

import pytest

from simvq_scale.train.checkpoint import Checkpointer, tag_for
from tests.helpers import one_error, tiny_overrides, train


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    """Two steps with a checkpoint after each: tags step000000001 and step000000002 (latest)."""
    out = tmp_path_factory.mktemp("run_dir") / "run"
    done = train(out, *tiny_overrides(demo_data, out, "train.steps=2", "train.ckpt_every=1", "train.log_every=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def snapshot(folder):
    """Every file under `folder` (but the lock) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


def metric_steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_is_refused(demo_data, run):
    before = snapshot(run)
    with open(run / "run.lock", "a+") as held:  # the other run: this test process holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("pid 4242 on node-07 since 2025-01-01 00:00:00\n")
        held.flush()
        done = train(run, *tiny_overrides(demo_data, run, "train.steps=3"), extra=["--resume", "auto"])
    error = one_error(done, 5)
    assert f"train.out_dir={run} is in use by another run (pid 4242 on node-07" in error
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_fresh_start_into_a_run_is_refused_and_changes_nothing(demo_data, run):
    before = snapshot(run)
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=2"))
    error = one_error(done, 5)
    assert "holds a run (checkpoint step000000002, generator_ema.pt)" in error
    assert "--resume auto" in error and "--overwrite" in error
    assert snapshot(run) == before


@pytest.mark.slow
def test_overwrite_starts_over_and_deletes_only_what_a_run_writes(demo_data, run):
    (run / "notes.txt").write_text("mine")
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=1", "train.log_every=1"), extra=["--overwrite"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fresh start: removed ckpt, tb, metrics.jsonl, generator_ema.pt, config.yaml" in done.stdout
    assert metric_steps(run) == [1]
    assert sorted(p.name for p in (run / "ckpt" / "generator").glob("step*")) == ["step000000001"]
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_resume_that_changes_shapes_is_one_error_before_anything_is_written(demo_data, run):
    before = snapshot(run)
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=3", "quantizer.dim=16", "optim.lr=1e-4"),
                 extra=["--resume", "auto"])
    error = one_error(done, 5)
    assert "the config changes quantizer.dim 32 -> 16; tensor shapes differ" in error
    assert "optim.lr" not in error  # a setting that changes no shape is not blamed
    assert snapshot(run) == before  # config.yaml, metrics.jsonl and the checkpoints untouched


@pytest.mark.slow
def test_a_resume_from_the_engine_folder_tidies_a_killed_run_and_lists_changed_settings(demo_data, run):
    # what a kill during step 3 leaves: its metrics row, a half-written export and latest, a partial tag
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss/total_g": 1.0}) + "\n")
    (run / "generator_ema.tmp").write_bytes(b"partial")
    (run / "ckpt" / "latest.tmp").write_text("step0000")
    (run / "ckpt" / "generator" / tag_for(3)).mkdir()
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=3", "train.log_every=1", "optim.lr=2e-4"),
                 extra=["--resume", str(run / "ckpt" / "generator")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with settings that differ from the checkpoint's: optim.lr 0.0004 -> 0.0002" in done.stdout
    assert "train.steps 2 -> 3" in done.stdout
    assert "resume: removed generator_ema.tmp, ckpt/latest.tmp, ckpt/generator/step000000003, 1 row(s) of " \
           "metrics.jsonl after step 2" in done.stdout
    assert metric_steps(run) == [1, 2, 3]  # step 3 once: the killed run's row went, the resumed run's came
    assert not (run / "generator_ema.tmp").exists() and not (run / "ckpt" / "latest.tmp").exists()
    assert (run / "ckpt" / "latest").read_text() == tag_for(3)


@pytest.mark.slow
def test_resume_paths_that_name_no_intact_checkpoint_are_clear_errors(demo_data, run):
    common = ["--dry-run", "--set", *tiny_overrides(demo_data, run, "train.steps=3")]
    missing = train(run, extra=["--resume", str(run / "ckpt" / "generator" / tag_for(9)), *common])
    assert "no such folder" in one_error(missing, 5)
    shutil.rmtree(run / "ckpt" / "discriminator" / tag_for(2))  # latest now names a half-deleted checkpoint
    broken = train(run, extra=["--resume", "auto", *common])
    error = one_error(broken, 5)
    assert f"checkpoint {tag_for(2)} is incomplete" in error
    assert f"--resume {run / 'ckpt' / 'generator' / tag_for(1)}" in error  # the intact one to use instead


@pytest.mark.slow
def test_rewinding_to_an_older_checkpoint_needs_overwrite(demo_data, run):
    older = str(run / "ckpt" / "generator" / tag_for(1))
    refused = train(run, *tiny_overrides(demo_data, run, "train.steps=2"), extra=["--resume", older])
    assert "would replace its later checkpoints step000000002: add --overwrite" in one_error(refused, 5)
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=1", "train.log_every=1"),
                 extra=["--resume", older, "--overwrite"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "ckpt" / "latest").read_text() == tag_for(1)
    assert not (run / "ckpt" / "generator" / tag_for(2)).exists()
    assert metric_steps(run) == [1]


def test_clean_up_keeps_the_highest_steps_and_whatever_latest_names(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 90, 100, 1000):
        for engine in ("generator", "discriminator"):
            (checkpointer.root / engine / tag_for(step)).mkdir(parents=True)
    (checkpointer.root / "generator" / "notes").mkdir()  # not a tag: never touched
    (checkpointer.root / "latest").write_text(tag_for(5))
    checkpointer._prune()
    kept = sorted(p.name for p in (checkpointer.root / "generator").iterdir())
    assert kept == ["notes", tag_for(5), tag_for(100), tag_for(1000)]
    assert sorted(p.name for p in (checkpointer.root / "discriminator").iterdir()) == [tag_for(5), tag_for(100),
                                                                                        tag_for(1000)]
