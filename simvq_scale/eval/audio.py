"""Audio reconstruction metrics, per clip, on mono waveforms (B, T) at the model's sample rate.

* PESQ wide-band (ITU-T P.862.2) at 16 kHz, from the `pesq` package, after resampling to 16 kHz.
* STOI (Taal et al. 2011) from `pystoi`, at the native rate (pystoi resamples to 10 kHz itself).
* Mel distance: mean |log mel(x) - log mel(x_hat)| (natural log, magnitudes clamped at 1e-5) of an
  80-band mel spectrogram, n_fft 1024, hop 256, window 1024, 0 Hz .. sample_rate / 2.
* V/UV F1: voiced/unvoiced labels of 10 ms frames of the original (reference) and of the reconstruction
  (prediction) from the YIN estimator below, F1 of the "voiced" class pooled over all frames.
* UTMOS: only from a local TorchScript file (16 kHz waveform (B, T) -> MOS (B,)); never random weights.

Voicing estimator (YIN, de Cheveigne & Kawahara 2002, steps 1-4, no interpolation): at 16 kHz, frames of
25 ms (400 samples) every 10 ms; difference function d(tau) for lags 1 .. 16000/60 Hz; cumulative mean
normalised difference d'(tau) = d(tau) * tau / sum_{k<=tau} d(k). A frame is voiced when
min d'(tau) over the pitch range 60-500 Hz is below YIN_THRESHOLD = 0.15 and its RMS is above
SILENCE_RMS = 1e-3 (-60 dBFS), so silence and background noise never count as voiced.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torchaudio.transforms import MelSpectrogram

PESQ_RATE = 16000
VOICING_RATE = 16000
FRAME = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
F0_MIN_HZ, F0_MAX_HZ = 60.0, 500.0
YIN_THRESHOLD = 0.15
SILENCE_RMS = 1e-3
MEL = dict(n_fft=1024, win_length=1024, hop_length=256, n_mels=80, f_min=0.0, power=1.0)
LOG_CLAMP = 1e-5


def missing_package(name: str) -> str | None:
    """None when `name` imports, else the reason a metric that needs it is unavailable."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        return f"unavailable (python package {name!r} not installed: {e}; pip install {name})"
    return None


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    return wave if rate == target else AF.resample(wave, rate, target)


def pesq_wb(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> list[float | None]:
    """PESQ-WB of each clip at 16 kHz; None where PESQ finds no speech (e.g. a silent clip)."""
    from pesq import PesqError, pesq

    ref = resample(reference.float().cpu(), rate, PESQ_RATE).double().numpy()
    deg = resample(degraded.float().cpu(), rate, PESQ_RATE).double().numpy()
    scores: list[float | None] = []
    for r, d in zip(ref, deg):
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # pesq normalises a silent clip by 0 before refusing it
                scores.append(float(pesq(PESQ_RATE, r, d, "wb")))
        except PesqError:
            scores.append(None)
    return scores


def stoi(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> list[float]:
    """STOI of each clip (pystoi, not the extended variant)."""
    from pystoi import stoi as pystoi_stoi

    ref = reference.float().cpu().double().numpy()
    deg = degraded.float().cpu().double().numpy()
    return [float(pystoi_stoi(r, d, rate, extended=False)) for r, d in zip(ref, deg)]


class MelDistance(torch.nn.Module):
    """(B,) mean absolute difference of log mel spectrograms (settings in the module docstring)."""

    def __init__(self, rate: int):
        super().__init__()
        self.mel = MelSpectrogram(sample_rate=rate, f_max=rate / 2, **MEL)

    @torch.no_grad()
    def forward(self, reference: torch.Tensor, degraded: torch.Tensor) -> torch.Tensor:
        def log_mel(w: torch.Tensor) -> torch.Tensor:
            return self.mel(w.float()).clamp_min(LOG_CLAMP).log()

        return (log_mel(reference) - log_mel(degraded)).abs().flatten(1).mean(1)


@torch.no_grad()
def voiced_frames(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, frames) bool: YIN voicing decision of each 10 ms frame (see the module docstring)."""
    x = resample(wave.float(), rate, VOICING_RATE)
    tau_max = int(VOICING_RATE / F0_MIN_HZ)
    tau_min = int(VOICING_RATE / F0_MAX_HZ)
    x = F.pad(x, (0, FRAME + tau_max))
    frames = x.unfold(-1, FRAME + tau_max, HOP)  # (B, F, FRAME + tau_max)
    frames = frames[:, : max(1, (wave.shape[-1] * VOICING_RATE // rate) // HOP)]
    head = frames[..., :FRAME]
    diff = torch.stack([(head - frames[..., tau:tau + FRAME]).pow(2).sum(-1) for tau in range(1, tau_max + 1)],
                       dim=-1)  # d(1..tau_max): (B, F, tau_max)
    lags = torch.arange(1, tau_max + 1, dtype=diff.dtype, device=diff.device)
    cmnd = diff * lags / diff.cumsum(-1).clamp_min(1e-12)
    aperiodicity = cmnd[..., tau_min - 1:].min(-1).values
    loud = head.pow(2).mean(-1).sqrt() > SILENCE_RMS
    return (aperiodicity < YIN_THRESHOLD) & loud


def vuv_confusion(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> torch.Tensor:
    """[true positives, false positives, false negatives, true negatives] of "voiced", summed over the batch."""
    truth, guess = voiced_frames(reference, rate), voiced_frames(degraded, rate)
    return torch.stack([(truth & guess).sum(), (~truth & guess).sum(), (truth & ~guess).sum(),
                        (~truth & ~guess).sum()]).double()


def f1_from_confusion(confusion: torch.Tensor) -> float | None:
    tp, fp, fn = (float(v) for v in confusion[:3])
    return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def load_utmos(path: str) -> torch.jit.ScriptModule:
    """A TorchScript UTMOS predictor: (B, T) 16 kHz waveform -> (B,) MOS. The error names --utmos-weights."""
    try:
        model = torch.jit.load(path, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as e:
        raise FileNotFoundError(f"--utmos-weights={path!r} is not a loadable TorchScript UTMOS model "
                                f"(16 kHz waveform (B, T) -> MOS (B,)): {e}") from None
    return model.eval()


def utmos_scores(model: torch.nn.Module, degraded: torch.Tensor, rate: int) -> torch.Tensor:
    with torch.no_grad():
        return model(resample(degraded.float(), rate, PESQ_RATE)).flatten().float()

