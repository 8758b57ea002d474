"""Metric functions against hand-computed values, and the offline-weights rules of the evaluation runner."""

import math

import pytest
import torch

from simvq_scale.config import DataConfig
from simvq_scale.eval import audio as A
from simvq_scale.eval.evaluator import MeanSums, MetricNetworks, optional_network
from simvq_scale.eval.image import ImageEvaluator, psnr_per_image, ssim_per_image
from simvq_scale.eval.runner import WHOLE_SET_WINDOW, global_code_counts
from simvq_scale.quant.stats import CodebookUsage

RATE = 24000


def test_psnr_of_a_known_noise_level_per_image():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) - 0.5  # [-0.5, 0.5]: +-delta stays inside [-1, 1], so no clamping
    sign = torch.randint(0, 2, x.shape) * 2 - 1
    deltas = torch.tensor([0.1, 0.02, 0.4]).view(3, 1, 1, 1)  # in [-1, 1] units; half of it on [0, 1]
    psnr = psnr_per_image(x, x + sign * deltas)
    expected = [10 * math.log10(1 / (d / 2) ** 2) for d in (0.1, 0.02, 0.4)]  # 26.02, 40.00, 13.98 dB
    assert psnr.tolist() == pytest.approx(expected, abs=1e-3)
    # the mean of per-image values differs from the PSNR of the pooled MSE (the reference code's figure)
    pooled = 10 * math.log10(1 / sum((d / 2) ** 2 for d in (0.1, 0.02, 0.4)) * 3)
    assert abs(psnr.mean().item() - pooled) > 1.0


@pytest.mark.parametrize("convention", ["paper", "torchmetrics"])
def test_ssim_is_one_for_identical_images_and_falls_with_noise(convention):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim_per_image(x, x, convention).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    light, heavy = (ssim_per_image(x, (x + s * torch.randn_like(x)).clamp(-1, 1), convention) for s in (0.05, 0.5))
    assert (light < 1).all() and (heavy < light).all()


def test_utilization_over_the_whole_set_counts_a_planted_index_set():
    torch.manual_seed(0)
    planted = torch.tensor([3, 17, 17, 100, 255, 3, 64])
    usage = CodebookUsage(256, WHOLE_SET_WINDOW)
    batches = [planted[torch.randint(len(planted), (5000,))] for _ in range(40)]  # 200k tokens: no step dropped
    batches.append(planted)  # every planted code at least once
    for b in batches:
        usage.update(b.view(50, -1) if b.numel() == 5000 else b)
    figures = usage.reduce()
    assert figures["utilization"] == len(set(planted.tolist())) / 256
    assert figures["window_tokens"] == sum(b.numel() for b in batches)
    assert torch.equal(global_code_counts(usage), torch.bincount(torch.cat(batches), minlength=256))


def _sine(f0: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(RATE * seconds)) / RATE
    return amplitude * torch.sin(2 * math.pi * f0 * t)


def test_vuv_f1_per_clip_from_planted_frame_labels(monkeypatch):
    truth = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    guess = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]).bool()
    reference, degraded = torch.zeros(4, 10), torch.ones(4, 10)  # stand-ins, told apart by the planted labels

    def planted(wave, rate):  # one voicing pass over originals then reconstructions
        assert torch.equal(wave, torch.cat([reference, degraded])) and rate == RATE
        return torch.cat([truth, guess])

    monkeypatch.setattr(A, "voiced_frames", planted)
    # clip 2: tp 1, fp 2, fn 1 -> 2/5; clips 3 and 4: no frame voiced in both -> None (the reference's NaN)
    assert A.vuv_f1(reference, degraded, RATE) == [1.0, pytest.approx(2 / 5), None, None]


def test_mel_distance_is_zero_for_identical_audio_and_grows_with_noise():
    torch.manual_seed(0)
    x = torch.stack([_sine(150), _sine(220)])
    mel = A.MelDistance(RATE)
    assert mel(x, x).tolist() == [0.0, 0.0]
    light, heavy = (mel(x, x + s * torch.randn_like(x)) for s in (0.01, 0.1))
    assert (light > 0).all() and (heavy > light).all()


def test_pesq_and_stoi_of_identical_and_degraded_speech_like_audio():
    pytest.importorskip("pesq", reason="pesq not installed: eval reports pesq_wb unavailable")
    pytest.importorskip("pystoi", reason="pystoi not installed: eval reports stoi unavailable")
    torch.manual_seed(0)
    t = torch.arange(RATE * 2) / RATE
    voice = sum(torch.sin(2 * math.pi * k * 140 * t) / k for k in range(1, 20)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    x = (0.3 * voice / voice.abs().max())[None]
    noisy = x + 0.05 * torch.randn_like(x)
    same, worse = A.pesq_wb(torch.cat([x, x]), torch.cat([x, noisy]), RATE)
    assert same == pytest.approx(4.64, abs=0.01)  # PESQ-WB's ceiling for a perfect copy
    assert worse < same - 1
    stoi_same, stoi_worse = A.stoi(torch.cat([x, x]), torch.cat([x, noisy]), RATE)
    assert stoi_same == pytest.approx(1.0, abs=1e-6) and stoi_worse < stoi_same
    assert A.pesq_wb(torch.zeros(1, RATE), torch.zeros(1, RATE), RATE) == [None]  # no speech: left out, counted


def test_a_missing_python_package_makes_the_metric_unavailable_with_the_reason():
    reason = A.missing_package("no_such_metric_package_xyz")
    assert reason.startswith("unavailable") and "no_such_metric_package_xyz" in reason
    assert A.AUDIO_EVAL_INSTALL in reason  # names the extra that brings the metric packages
    assert A.missing_package("torch") is None


def test_mean_sums_skip_missing_values_and_report_none_when_empty():
    sums = MeanSums(("a", "b"), torch.device("cpu"))
    sums.add("a", torch.tensor([1.0, 2.0]))
    sums.add("a", [6.0, None])
    assert sums.reduce() == {"a": (3.0, 3), "b": (None, 0)}


def test_missing_default_weights_make_metrics_unavailable_and_explicit_paths_fail_by_option(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMVQ_WEIGHTS_DIR", str(tmp_path / "empty"))
    evaluator = ImageEvaluator(torch.device("cpu"), MetricNetworks(), DataConfig())
    assert set(evaluator.unavailable) == {"lpips_vgg", "lpips_alex", "rfid"}
    for metric, option in (("lpips_vgg", "--lpips-vgg"), ("lpips_alex", "--lpips-alex"), ("rfid", "--fid-inception")):
        reason = evaluator.unavailable[metric]
        assert reason.startswith("unavailable") and option in reason and "simvq-fetch-weights" in reason
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    evaluator.update(x, x)
    figures = evaluator.compute()  # PSNR/SSIM still computed; nothing faked for the missing networks
    assert set(figures) == {"psnr", "ssim"} and figures["ssim"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match=r"--fid-inception=.*nope\.pt"):
        ImageEvaluator(torch.device("cpu"), MetricNetworks(fid_inception=str(tmp_path / "nope.pt"),
                                                           skip=("lpips_vgg", "lpips_alex")), DataConfig())
    with pytest.raises(FileNotFoundError, match=r"--utmos-weights='.*utmos\.pt'"):
        optional_network("utmos", "--utmos-weights", str(tmp_path / "utmos.pt"), A.load_utmos, MetricNetworks(), {})
    with pytest.raises(ValueError, match="--skip psnr"):
        MetricNetworks(skip=("psnr",))
