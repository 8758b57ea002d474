"""Audio reconstruction metrics, per clip, on mono waveforms (B, T) at the model's sample rate.

* PESQ wide-band (ITU-T P.862.2) at 16 kHz, from the `pesq` package, after resampling to 16 kHz.
* STOI (Taal et al. 2011) from `pystoi`, at the native rate (pystoi resamples to 10 kHz itself).
* Mel distance: mean |log mel(x) - log mel(x_hat)| of the package's log-mel (simvq_scale.losses.audio) with
  the settings EVAL_LOG_MEL (MEL_DISTANCE_NOTE spells them out).
* V/UV F1: the SimVQ reference's (metrics/periodicity.py, after cargan): voicing of 10 ms frames from CREPE
  (see `voiced_frames`) for the original (truth) and the reconstruction (prediction), F1 of "voiced" per clip,
  averaged over clips. A clip where no frame is voiced in both has no F1 (the reference gets NaN there and
  leaves it out); the runner counts such clips.
* UTMOS: only from a local TorchScript file (16 kHz waveform (B, T) -> MOS (B,)); never random weights.

pesq, pystoi and torchcrepe come with the `audio-eval` extra; without one of them its metric is reported
unavailable with a reason naming the extra (`missing_package`). AudioEvaluator reduces them over an evaluation set.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
import torchaudio.functional as AF

from simvq_scale.config import DataConfig
from simvq_scale.distributed import all_reduce_sum
from simvq_scale.eval.evaluator import Evaluator, MeanSums, MetricNetworks, optional_network
from simvq_scale.losses.audio import LogMelSpectrogram

PESQ_RATE = 16000
AUDIO_EVAL_INSTALL = "pip install 'simvq-scale[audio-eval]'"
EVAL_LOG_MEL = dict(n_fft=1024, hop=256, n_mels=80, floor=1e-5)

# CREPE voicing with the reference's settings (metrics/periodicity.py): torchcrepe's network at CREPE_RATE on frames
# of CREPE_WINDOW samples every CREPE_HOP (10 ms) without padding, pitch range CREPE_F0_RANGE_HZ, Viterbi decoding.
# A frame is voiced when its periodicity (the network's confidence in the decoded pitch bin) is at least
# PERIODICITY_THRESHOLD and its A-weighted level (mean over frequency of librosa.perceptual_weighting of the power
# spectrum, minus torchcrepe's 20 dB reference) at least SILENCE_DB.
CREPE_RATE = 16000
CREPE_WINDOW = 1024
CREPE_HOP = 160
CREPE_MODEL = "full"
CREPE_F0_RANGE_HZ = (50.0, 550.0)
PERIODICITY_THRESHOLD = 0.21
SILENCE_DB = -60.0
FRAMES_PER_FORWARD = 512  # CREPE frames per network call (bounds memory; the decoding still sees whole clips)

MEL_DISTANCE_NOTE = ("mean |log mel - log mel'| per clip, {n_mels} bands, n_fft {n_fft}, hop {hop}, "
                     "floor {floor:g}").format(**EVAL_LOG_MEL)
VUV_F1_NOTE = (f"F1 of voiced 10 ms frames per clip, mean over clips; the reference's voicing: torchcrepe "
               f"'{CREPE_MODEL}' at 16 kHz, {CREPE_F0_RANGE_HZ[0]:g}-{CREPE_F0_RANGE_HZ[1]:g} Hz, Viterbi, "
               f"periodicity >= {PERIODICITY_THRESHOLD}, A-weighted level >= {SILENCE_DB:g} dB")


def audio_eval_package(name: str):
    """The module `name` of the audio-eval extra; an ImportError naming the extra when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"python package {name!r} not installed ({e}); {AUDIO_EVAL_INSTALL}") from e


def missing_package(name: str) -> str | None:
    """None when `name` imports, else the reason a metric that needs it is unavailable."""
    try:
        audio_eval_package(name)
    except ImportError as e:
        return f"unavailable ({e})"
    return None


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    return wave if rate == target else AF.resample(wave, rate, target)


def pesq_wb(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> list[float | None]:
    """PESQ-WB of each clip at 16 kHz; None where PESQ finds no speech (e.g. a silent clip)."""
    pesq = audio_eval_package("pesq")
    ref = resample(reference.float().cpu(), rate, PESQ_RATE).double().numpy()
    deg = resample(degraded.float().cpu(), rate, PESQ_RATE).double().numpy()
    scores: list[float | None] = []
    for r, d in zip(ref, deg):
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # pesq normalises a silent clip by 0 before refusing it
                scores.append(float(pesq.pesq(PESQ_RATE, r, d, "wb")))
        except pesq.PesqError:
            scores.append(None)
    return scores


def stoi(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> list[float]:
    """STOI of each clip (pystoi, not the extended variant)."""
    pystoi = audio_eval_package("pystoi")
    ref = reference.float().cpu().double().numpy()
    deg = degraded.float().cpu().double().numpy()
    return [float(pystoi.stoi(r, d, rate, extended=False)) for r, d in zip(ref, deg)]


class MelDistance(torch.nn.Module):
    """(B,) mean absolute difference of log mel spectrograms (EVAL_LOG_MEL settings)."""

    def __init__(self, rate: int):
        super().__init__()
        self.log_mel = LogMelSpectrogram(rate, **EVAL_LOG_MEL)

    @torch.no_grad()
    def forward(self, reference: torch.Tensor, degraded: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(reference) - self.log_mel(degraded)).abs().flatten(1).mean(1)


@torch.no_grad()
def voiced_frames(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, frames) bool: CREPE voicing of each 10 ms frame (settings above), 1 + (T16 - 1024) // 160 frames for
    T16 samples at 16 kHz (none for clips under 64 ms). Needs torchcrepe (its wheel carries the weights)."""
    torchcrepe = audio_eval_package("torchcrepe")
    librosa = audio_eval_package("librosa")  # a dependency of torchcrepe
    x = resample(wave.float(), rate, CREPE_RATE)
    batch, length = x.shape
    if length < CREPE_WINDOW:
        return torch.zeros(batch, 0, dtype=torch.bool, device=wave.device)
    # torchcrepe.predict decodes each batch of frames on its own, so a bounded batch would cut the Viterbi path
    # at batch edges: run the network in chunks here and decode whole clips, as predict does with batch_size=None.
    frames = torch.cat([next(torchcrepe.preprocess(clip[None], CREPE_RATE, CREPE_HOP, None, x.device, pad=False))
                        for clip in x])
    probabilities = torch.cat([torchcrepe.infer(chunk, CREPE_MODEL, x.device)
                               for chunk in frames.split(FRAMES_PER_FORWARD)])
    _, periodicity = torchcrepe.postprocess(probabilities.reshape(batch, -1, torchcrepe.PITCH_BINS).transpose(1, 2),
                                            *CREPE_F0_RANGE_HZ, torchcrepe.decode.viterbi, return_periodicity=True)
    power = AF.spectrogram(x, pad=0, window=torch.hann_window(CREPE_WINDOW, device=x.device), n_fft=CREPE_WINDOW,
                           hop_length=CREPE_HOP, win_length=CREPE_WINDOW, power=2, normalized=False, center=False)
    freqs = librosa.fft_frequencies(sr=CREPE_RATE, n_fft=CREPE_WINDOW)
    # per clip: power_to_db inside perceptual_weighting floors at 80 dB below the clip's peak (its top_db)
    with np.errstate(divide="ignore"):  # A-weighting takes log10(0) at 0 Hz before librosa clips it to -80 dB
        level = np.stack([(librosa.perceptual_weighting(p.cpu().numpy(), freqs) - torchcrepe.loudness.REF_DB).mean(0)
                          for p in power])
    loud = torch.from_numpy(level >= SILENCE_DB).to(periodicity.device)
    return ((periodicity >= PERIODICITY_THRESHOLD) & loud).to(wave.device)


def vuv_f1(reference: torch.Tensor, degraded: torch.Tensor, rate: int) -> list[float | None]:
    """F1 of "voiced" frames of each clip, the reference's voicing as truth; None where no frame is voiced in both
    (precision or recall 0/0 or F1 0/0 in the reference, which leaves such clips out)."""
    voiced = voiced_frames(torch.cat([reference, degraded]), rate)
    truth, guess = voiced.chunk(2)
    tp, fp, fn = ((truth & guess).sum(1), (~truth & guess).sum(1), (truth & ~guess).sum(1))
    return [None if t == 0 else 2 * t / (2 * t + p + n) for t, p, n in zip(tp.tolist(), fp.tolist(), fn.tolist())]


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



class AudioEvaluator(Evaluator):
    METRICS = ("pesq_wb", "stoi", "mel_distance", "vuv_f1", "utmos")
    SKIPPABLE = METRICS
    NOTES = {
        "pesq_wb": "PESQ wide-band (P.862.2) at 16 kHz, mean per clip",
        "stoi": "STOI (pystoi), mean per clip",
        "mel_distance": MEL_DISTANCE_NOTE,
        "vuv_f1": VUV_F1_NOTE,
        "utmos": "UTMOS from the TorchScript file given by --utmos-weights, mean per clip",
    }
    TABLE_COLUMNS = (("pesq_wb", "PESQ", ".3f"), ("stoi", "STOI", ".3f"), ("mel_distance", "mel distance", ".3f"),
                     ("vuv_f1", "V/UV F1", ".3f"))
    COMPARISON_NOTE = "PESQ is wide-band at 16 kHz; V/UV F1 comes from CREPE voicing, as the reference's"
    # per-clip metrics that have no figure for some clips, and why (counted and noted in the report)
    LEFT_OUT = {"pesq_wb": "without detectable speech",
                "vuv_f1": "with no frame voiced in both the original and the reconstruction (as the reference does)"}

    def __init__(self, device: torch.device, networks: MetricNetworks, data: DataConfig):
        super().__init__(device, networks, data)
        self.rate = data.sample_rate
        for metric, package in (("pesq_wb", "pesq"), ("stoi", "pystoi"), ("vuv_f1", "torchcrepe")):
            reason = "skipped (--skip)" if metric in networks.skip else missing_package(package)
            if reason:
                self.unavailable[metric] = reason
        if not networks.utmos_weights and "utmos" not in networks.skip:
            self.unavailable["utmos"] = "unavailable (no --utmos-weights)"
        self.utmos = (optional_network("utmos", "--utmos-weights", networks.utmos_weights, load_utmos,
                                       networks, self.unavailable) if networks.utmos_weights else None)
        if self.utmos is not None:
            self.utmos.to(device)
        if "mel_distance" in networks.skip:
            self.unavailable["mel_distance"] = "skipped (--skip)"
        self.mel = MelDistance(self.rate).to(device)
        self.means = MeanSums(self.METRICS, device)
        self.left_out = torch.zeros(len(self.LEFT_OUT), dtype=torch.float64, device=device)  # clips without a figure

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Waveforms (B, T) and the decoder's output (B, [1,] T'), both cut to the shorter length."""
        x_hat = x_hat.float().reshape(x_hat.shape[0], -1)
        n = min(x.shape[-1], x_hat.shape[-1])
        x, x_hat = x[:, :n], x_hat[:, :n].clamp(-1, 1)
        for metric, per_clip in (("pesq_wb", pesq_wb), ("vuv_f1", vuv_f1)):
            if metric not in self.unavailable:
                scores = per_clip(x, x_hat, self.rate)
                self.means.add(metric, scores)
                self.left_out[list(self.LEFT_OUT).index(metric)] += sum(s is None for s in scores)
        if "stoi" not in self.unavailable:
            self.means.add("stoi", stoi(x, x_hat, self.rate))
        if "mel_distance" not in self.unavailable:
            self.means.add("mel_distance", self.mel(x, x_hat))
        if self.utmos is not None:
            self.means.add("utmos", utmos_scores(self.utmos, x_hat, self.rate))

    def compute(self) -> dict[str, float | None]:
        means = self.means.reduce()
        figures = {name: mean for name, (mean, _) in means.items() if name not in self.unavailable}
        left_out = all_reduce_sum(self.left_out.clone()).tolist()
        for (metric, why), n in zip(self.LEFT_OUT.items(), left_out):
            if n:
                self.notes[f"{metric}_left_out"] = f"{int(n)} of {int(n) + means[metric][1]} clips {why} left out"
        return figures
