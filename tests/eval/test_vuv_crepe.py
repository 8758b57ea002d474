"""V/UV F1 with the SimVQ reference's CREPE voicing, on real speech. torchcrepe's "full" network runs on the CPU
here (about 7 frames of 10 ms per second on a shared 2-core machine), hence the short clips and the slow mark."""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simvq_scale.config import DataConfig
from simvq_scale.eval import audio as A
from simvq_scale.eval.evaluator import MetricNetworks
from tests.helpers import SHARED_DATA

torchcrepe = pytest.importorskip("torchcrepe", reason="torchcrepe (the audio-eval extra) is not installed")
pytestmark = pytest.mark.slow

RATE = 24000
SPEECH = ("nl-bigfish", "nl-smallfish", "espeak-ensc-m1")  # two human voices, one synthetic
REFERENCE_CODE_ENV = "SIMVQ_REFERENCE_CODE"  # a checkout of github.com/youngsheen/SimVQ, for the second check


def _speech(shared_data: Path, seconds: float, start: float = 0.25) -> torch.Tensor:
    import soundfile as sf

    clips = []
    for speaker in SPEECH:
        wave, rate = sf.read(sorted((shared_data / "speech" / "test" / speaker).rglob("*.flac"))[0], dtype="float32")
        assert rate == RATE
        clips.append(torch.from_numpy(wave[int(start * RATE): int((start + seconds) * RATE)]))
    return torch.stack(clips)


def _no_network(*args, **kwargs):
    raise AssertionError("CREPE voicing tried to open a network connection")


@pytest.fixture(scope="module")
def voicing() -> dict:
    """Voicing of 1 s of three real utterances and of a clip that is silent, then white noise; computed once, with
    every socket connection refused (the weights must come from the installed wheel)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real development data not found at {SHARED_DATA}")
    speech = _speech(SHARED_DATA, 1.0)
    g = torch.Generator().manual_seed(0)
    quiet_then_noise = torch.cat([torch.zeros(RATE // 2), 0.1 * torch.randn(RATE // 2, generator=g)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        voiced = A.voiced_frames(torch.cat([speech, quiet_then_noise[None]]), RATE)
    return {"speech": speech, "voiced": voiced}


def test_crepe_runs_from_the_wheels_weights_and_frames_every_10_ms(voicing):
    assert (Path(torchcrepe.__file__).parent / "assets" / f"{A.CREPE_MODEL}.pth").is_file()
    assert voicing["voiced"].shape == (4, 1 + (16000 - A.CREPE_WINDOW) // A.CREPE_HOP)  # 1 s at 16 kHz, no padding


def test_real_speech_is_mostly_voiced_and_silence_or_noise_is_not(voicing):
    speech_share = voicing["voiced"][:3].float().mean(1)
    # clean speech: the reference's detector marks 54-91% of frames voiced on whole utterances (YIN: 19-66%)
    assert ((speech_share > 0.4) & (speech_share < 1.0)).all(), speech_share.tolist()
    silence, noise = voicing["voiced"][3].chunk(2)
    assert not silence[:-4].any()  # the last frames overlap the noise
    assert noise.float().mean() < 0.05


def test_identical_speech_scores_1_and_a_silent_clip_is_left_out_counted(voicing):
    x = torch.stack([voicing["speech"][0, : RATE // 2], torch.zeros(RATE // 2)])
    evaluator = A.AudioEvaluator(torch.device("cpu"), MetricNetworks(skip=("pesq_wb", "stoi")),
                                 DataConfig(modality="audio", sample_rate=RATE))
    evaluator.update(x, x.clone())
    figures = evaluator.compute()
    assert figures["vuv_f1"] == 1.0
    assert evaluator.notes["vuv_f1_left_out"].startswith("1 of 2 clips with no frame voiced in both")


def test_voicing_equals_the_reference_codes(voicing):
    """Second check, against the reference's own metrics/periodicity.py (needs its checkout and librosa)."""
    code = os.environ.get(REFERENCE_CODE_ENV)
    if not code or not (Path(code) / "metrics" / "periodicity.py").is_file():
        pytest.skip(f"set {REFERENCE_CODE_ENV} to a checkout of github.com/youngsheen/SimVQ to compare with its code")
    sys.path.insert(0, code)
    try:
        from metrics.periodicity import predict_pitch
    finally:
        sys.path.remove(code)
    for clip, ours in zip(voicing["speech"], voicing["voiced"]):
        pitch, _ = predict_pitch(A.resample(clip[None], RATE, A.CREPE_RATE))  # its input: (1, T) at 16 kHz
        assert torch.equal(torch.from_numpy(~np.isnan(pitch[0])), ours)
