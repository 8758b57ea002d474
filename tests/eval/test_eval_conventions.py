"""Image metrics against independent code (skimage, scipy) on real photos, the one log-mel against torchaudio
with each caller's former settings, and audio metrics whose package is missing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from simvq_scale.eval import audio as A
from simvq_scale.config import DataConfig
from simvq_scale.eval.audio import AudioEvaluator
from simvq_scale.eval.evaluator import MetricNetworks
from simvq_scale.eval.image import MAX_PSNR_DB, SSIM_CONVENTIONS, ImageEvaluator, psnr_per_image, ssim_per_image
from simvq_scale.eval.runner import markdown_table, metric_notes
from simvq_scale.losses.audio import LogMelSpectrogram
from tests.helpers import ROOT
RATE = 24000
NO_IMAGE_NETWORKS = MetricNetworks(skip=("lpips_vgg", "lpips_alex", "rfid"))


@pytest.fixture
def photos_and_reconstructions(shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    """8 real photos at 128 px in [-1, 1] (as the pipeline decodes them) and tokenizer-like reconstructions:
    detail lost (down- and up-sampled), a colour shift, noise, overshoot beyond [-1, 1]."""
    files = sorted((shared_data / "photos" / "val").rglob("*.jpg"))[:8]
    assert len(files) == 8, f"expected real photos under {shared_data / 'photos' / 'val'}"
    pixels = [torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((128, 128), Image.BICUBIC)))
              for f in files]
    x = torch.stack(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=2, mode="bilinear")
    return x, smooth + 0.03 + 0.06 * torch.randn(x.shape, generator=g)


def _reference_ssim(x: torch.Tensor, x_hat: torch.Tensor) -> list[float]:
    """The SimVQ reference's evaluation.py lines: clamp, [0, 1], 8 bits by truncation, skimage per image."""
    def as_8_bit_hwc(t):
        return (((t.clamp(-1, 1) + 1) / 2) * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()

    restored = as_8_bit_hwc(x_hat).astype(np.float32) / 255.0
    gt = as_8_bit_hwc(x).astype(np.float32) / 255.0
    return [structural_similarity(r, g, data_range=1.0, channel_axis=-1) for r, g in zip(restored, gt)]


def _gaussian_ssim_with_mirrored_border(x: torch.Tensor, x_hat: torch.Tensor) -> list[float]:
    """SSIM written out with scipy in float64: Gaussian sigma 1.5 truncated at 11 taps, the border mirrored
    without repeating the edge pixel (scipy 'mirror' = torch 'reflect'), population moments, whole-map mean."""
    def blur(a):
        return ndimage.gaussian_filter(a, sigma=(0, 1.5, 1.5), truncate=3.5, mode="mirror")

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for a, b in zip(((x.double() + 1) / 2).clamp(0, 1).numpy(), ((x_hat.double() + 1) / 2).clamp(0, 1).numpy()):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        out.append(float(ssim_map.mean()))
    return out


def test_paper_ssim_is_the_reference_code_and_torchmetrics_ssim_is_the_gaussian_mirrored_map(
        photos_and_reconstructions):
    x, x_hat = photos_and_reconstructions
    paper, gaussian = ssim_per_image(x, x_hat, "paper"), ssim_per_image(x, x_hat, "torchmetrics")
    assert paper.tolist() == pytest.approx(_reference_ssim(x, x_hat), abs=1e-4)
    assert gaussian.tolist() == pytest.approx(_gaussian_ssim_with_mirrored_border(x, x_hat), abs=1e-4)
    assert ((paper - gaussian).abs() > 0.005).all()  # the conventions differ by more than the tolerance above
    assert ssim_per_image(x, x, "paper").tolist() == pytest.approx([1.0] * 8, abs=1e-5)  # float32 moments
    with pytest.raises(ValueError, match="'wang'"):
        ssim_per_image(x, x_hat, "wang")


@pytest.mark.parametrize("convention", sorted(SSIM_CONVENTIONS))
def test_the_report_names_the_ssim_convention_it_used(photos_and_reconstructions, convention):
    x, x_hat = photos_and_reconstructions
    evaluator = ImageEvaluator(torch.device("cpu"), MetricNetworks(skip=NO_IMAGE_NETWORKS.skip,
                                                                   ssim_convention=convention), DataConfig())
    evaluator.update(x[:5], x_hat[:5])
    evaluator.update(x[5:], x_hat[5:])
    figures = evaluator.compute()
    assert figures["ssim"] == pytest.approx(ssim_per_image(x, x_hat, convention).mean().item(), rel=1e-6)
    assert evaluator.conventions == {"ssim": convention}
    assert evaluator.notes["ssim"].startswith(f"mean per image; {convention} convention: ")
    with pytest.raises(ValueError, match="--ssim-convention skimage"):
        MetricNetworks(ssim_convention="skimage")


def test_psnr_per_image_is_skimages_and_identical_images_are_capped(photos_and_reconstructions):
    x, x_hat = photos_and_reconstructions
    unit = [((t.double() + 1) / 2).clamp(0, 1).numpy() for t in (x, x_hat)]
    expected = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(*unit)]
    assert psnr_per_image(x, x_hat).tolist() == pytest.approx(expected, abs=1e-3)
    nearly = x.clone()
    nearly[0, 0, 0, 0] += 2 * 2e-3  # one pixel off by 2e-3 on [0, 1]: MSE 8.1e-11, under the 1e-10 floor
    assert psnr_per_image(x[:2], nearly[:2]).tolist() == [MAX_PSNR_DB, MAX_PSNR_DB]


def _real_speech(shared_data: Path, seconds: float) -> torch.Tensor:
    """(2, T) two real utterances (human voices, with pauses) at 24 kHz."""
    import soundfile as sf

    clips = []
    for speaker in ("nl-bigfish", "nl-smallfish"):
        wave, rate = sf.read(sorted((shared_data / "speech" / "test" / speaker).rglob("*.flac"))[0], dtype="float32")
        assert rate == RATE
        clips.append(torch.from_numpy(wave[: int(seconds * RATE)]))
    return torch.stack(clips)


def test_one_log_mel_gives_the_training_loss_and_the_eval_distance_their_former_figures(shared_data):
    x = _real_speech(shared_data, 2.0)
    x[:, : RATE // 4] = 0  # a leading pause in digital silence: mel magnitudes under both floors
    g = torch.Generator().manual_seed(0)
    x_hat = 0.8 * x + 0.003 * torch.randn(x.shape, generator=g)
    # the former losses/audio.py LogMelSpectrogram: 100 bands, floor 1e-7
    loss_mel = torchaudio.transforms.MelSpectrogram(sample_rate=RATE, n_fft=1024, hop_length=256, n_mels=100,
                                                    center=True, power=1)
    assert torch.equal(LogMelSpectrogram(RATE, 1024, 256, 100)(x), loss_mel(x).clamp(min=1e-7).log())
    # the former eval/audio.py MelDistance: 80 bands, floor 1e-5
    eval_mel = torchaudio.transforms.MelSpectrogram(sample_rate=RATE, f_max=RATE / 2, n_fft=1024, win_length=1024,
                                                    hop_length=256, n_mels=80, f_min=0.0, power=1.0)

    def former_distance(floor):
        return (eval_mel(x).clamp_min(floor).log() - eval_mel(x_hat).clamp_min(floor).log()).abs().flatten(1).mean(1)

    distance = A.MelDistance(RATE)(x, x_hat)
    assert torch.equal(distance, former_distance(1e-5))
    assert not torch.allclose(distance, former_distance(1e-7), rtol=1e-3)  # the floor matters on this audio


AUDIO_EVAL = {"pesq_wb": "pesq", "stoi": "pystoi", "vuv_f1": "torchcrepe"}  # metric (and function) -> package
HIDE_AND_EVALUATE = """
import json, sys
import torch
for name in {packages}:
    sys.modules[name] = None  # `import name` now raises ImportError, as when the package is not installed
from simvq_scale.config import DataConfig
from simvq_scale.eval import audio as A
from simvq_scale.eval.audio import AudioEvaluator
from simvq_scale.eval.evaluator import MetricNetworks
evaluator = AudioEvaluator(torch.device("cpu"), MetricNetworks(), DataConfig(modality="audio", sample_rate=24000))
t = torch.arange(24000) / 24000
x = 0.3 * torch.sin(2 * torch.pi * 150 * t)[None].repeat(2, 1)
evaluator.update(x, 0.9 * x)
figures = evaluator.compute()
errors = {{}}
for metric in {metrics}:
    try:
        getattr(A, metric)(x, x, 24000)
    except ImportError as e:
        errors[metric] = str(e)
print(json.dumps({{"figures": figures, "unavailable": evaluator.unavailable, "errors": errors}}))
"""


@pytest.mark.slow
def test_missing_audio_eval_packages_make_their_metrics_unavailable_naming_the_extra():
    script = HIDE_AND_EVALUATE.format(packages=list(AUDIO_EVAL.values()), metrics=list(AUDIO_EVAL))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]  # nothing imports them at load time
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["figures"]["mel_distance"] > 0  # the rest is still computed
    for metric, package in AUDIO_EVAL.items():
        reason = report["unavailable"][metric]
        assert reason.startswith("unavailable") and repr(package) in reason and A.AUDIO_EVAL_INSTALL in reason
        assert metric not in report["figures"]
        # called directly, the function fails with an error naming the package and the extra
        assert repr(package) in report["errors"][metric] and A.AUDIO_EVAL_INSTALL in report["errors"][metric]


def test_the_markdown_table_puts_how_each_figure_was_computed_beside_it(photos_and_reconstructions, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setenv("SIMVQ_WEIGHTS_DIR", str(tmp_path / "empty"))  # no network files: rfid unavailable
    x, x_hat = photos_and_reconstructions
    evaluator = ImageEvaluator(torch.device("cpu"), MetricNetworks(), DataConfig())
    evaluator.update(x, x_hat)
    report = {"checkpoint": "c", "step": 1, "modality": "image", "codebook_size": 8, "samples": 8, "tokens": 8,
              "world_size": 1, "metrics": {"utilization": 0.5, "perplexity": 3.0, **evaluator.compute()},
              "unavailable": evaluator.unavailable, "skipped_samples": {},
              "notes": {**metric_notes(ImageEvaluator), **evaluator.notes}}
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in markdown_table(report).splitlines()
            if line.startswith("| ") and not line.startswith("| metric")}
    assert rows["ssim"][1].startswith("mean per image; paper convention: ")
    assert rows["rfid"][0].startswith("unavailable (no weights file")
    assert "resized to 299x299 by bilinear interpolation" in rows["rfid"][1]  # the resize path, beside the figure
    assert float(rows["psnr"][0]) == pytest.approx(report["metrics"]["psnr"], abs=1e-4)
    audio = {**report, "modality": "audio", "metrics": {"utilization": 0.5, "mel_distance": 1.0},
             "notes": metric_notes(AudioEvaluator)}
    table_rows = [line for line in markdown_table(audio).splitlines() if line.startswith("| ")]
    assert any("\\|log mel" in line for line in table_rows)  # mel distance's note holds pipes: escaped
    assert all(len(re.split(r"(?<!\\)\|", line)) == 5 for line in table_rows)  # 3 cells in every row
