"""Files a user may have downloaded are never unpickled with the full unpickler: a crafted export, rank file
or DeepSpeed checkpoint file that would create a marker file is refused with one clear line (exit code 6
from launch/train.py), and the marker never appears."""

import shutil
import subprocess
import sys

import pytest

from simvq_scale.inference import EXPORT_NAME, load_tokenizer
from simvq_scale.train.checkpoint import TRAINER_STATE, read_trainer_state
from simvq_scale.weights_only import UnsafeFileError
from tests.helpers import one_error, plant, tiny_overrides, train

# every test reads a run that launch/train.py trained in a subprocess: the slow lane
pytestmark = pytest.mark.slow
# G at the default ZeRO-0 (its optimizer state inside the model-states file), D at ZeRO-1: both kinds of
# DeepSpeed file, each read through the weights-only loader
ZERO_STAGES = ("optim.zero_stage_d=1",)


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    """One step of the tiny image model on one plain-python process: checkpoint step000000001 and the export."""
    out = tmp_path_factory.mktemp("untrusted") / "run"
    done = train(out, *tiny_overrides(demo_data, out, "train.steps=1", "train.ckpt_every=1", *ZERO_STAGES))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_payload_runs_under_the_full_unpickler(trained_run, tmp_path):
    # the control: the crafted file is live, so the refusals below are what keeps the marker away
    crafted, marker = tmp_path / "crafted.pt", tmp_path / "marker"
    shutil.copy(trained_run / EXPORT_NAME, crafted)
    plant(crafted, marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(crafted)!r}, weights_only=False)"],
                   check=True, timeout=120)
    assert marker.exists()


def test_a_crafted_export_is_refused_by_load_tokenizer(trained_run, tmp_path):
    crafted, marker = tmp_path / EXPORT_NAME, tmp_path / "marker"
    shutil.copy(trained_run / EXPORT_NAME, crafted)
    plant(crafted, marker)
    with pytest.raises(UnsafeFileError, match=rf"{crafted}: refused to load \(Unsupported global: GLOBAL exec\)"):
        load_tokenizer(tmp_path)
    assert not marker.exists()
    assert load_tokenizer(trained_run).step == 1  # the untouched export loads weights-only


@pytest.mark.parametrize("crafted_file", [
    "generator/step000000001/rank_0.pt",  # read by the checkpointer (usage window)
    "generator/step000000001/mp_rank_00_model_states.pt",  # read by DeepSpeed (weights, client state, ZeRO-0 optimizer)
    "discriminator/step000000001/zero_pp_rank_0_mp_rank_00_optim_states.pt",  # read by DeepSpeed (ZeRO)
])
def test_a_crafted_checkpoint_file_stops_the_resume(demo_data, trained_run, tmp_path, crafted_file):
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained_run, run)
    plant(run / "ckpt" / crafted_file, marker)
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=2", *ZERO_STAGES), extra=["--resume", "auto"])
    assert f"{run / 'ckpt' / crafted_file}: refused to load" in one_error(done, 6)
    assert not marker.exists()


def test_a_checkpoint_without_trainer_state_is_described_from_deepspeeds_files_weights_only(trained_run, tmp_path):
    # checkpoints written before trainer_state.json existed: the same description from DeepSpeed's files
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained_run, run)
    root, tag = run / "ckpt", "step000000001"
    described = read_trainer_state(root, tag)
    (root / "generator" / tag / TRAINER_STATE).unlink()
    fallback = read_trainer_state(root, tag)
    for key in ("step", "world_size", "zero_stage", "shapes"):
        assert fallback[key] == described[key], key
    assert fallback["config"] == described["config"]
    plant(root / "generator" / tag / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="mp_rank_00_model_states.pt: refused to load"):
        read_trainer_state(root, tag)
    assert not marker.exists()
