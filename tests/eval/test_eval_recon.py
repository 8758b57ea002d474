"""Evaluation over shards: 2 gloo ranks give the single-process figures; the tool's report and offline weights."""

import json
from pathlib import Path

import pytest
import torch

from simvq_scale.eval.runner import MetricNetworks, evaluate, limited_eval_loader
from simvq_scale.inference import load_tokenizer
from simvq_scale.pretrained import FID_INCEPTION_FILE, LPIPS_FEATURE_FILES, weights_dir
from tests.dist_utils import run_distributed
from tests.helpers import ROOT, run_tool

# The metric networks (LPIPS, Inception, CREPE) are slow on a CPU; the rank-equality check needs only the reductions.
NO_NETWORKS = MetricNetworks(skip=("lpips_vgg", "lpips_alex", "rfid", "vuv_f1"))
SAMPLES = {"image": 13, "audio": 7}  # odd counts: uneven rank ranges and padded batches
BATCH = 4


def _shards(demo_data: dict, modality: str) -> str:
    return str(Path(demo_data["dir"]).parent / demo_data[f"{modality}_val"])


def _evaluate(run: Path, shards: str, modality: str, rank: int, world_size: int) -> dict:
    tokenizer = load_tokenizer(run)
    loader = limited_eval_loader(tokenizer.config.data, shards, BATCH, rank, world_size, SAMPLES[modality])
    return evaluate(tokenizer, loader, NO_NETWORKS, progress=False)


def _evaluate_on_rank(rank: int, world_size: int, runs: dict, shards: dict) -> dict:
    return {m: _evaluate(runs[m], shards[m], m, rank, world_size) for m in runs}


@pytest.mark.slow
def test_two_ranks_give_the_single_process_figures(tiny_runs, demo_data):
    shards = {m: _shards(demo_data, m) for m in tiny_runs}
    single = {m: _evaluate(tiny_runs[m], shards[m], m, 0, 1) for m in tiny_runs}
    ranks = run_distributed(_evaluate_on_rank, 2, dict(tiny_runs), shards, timeout_s=240)
    for modality, expected in single.items():
        assert expected["samples"] == SAMPLES[modality] and expected["world_size"] == 1
        assert expected["metrics"]["utilization"] > 0
        for report in (r[modality] for r in ranks):  # the same report on every rank
            assert report["world_size"] == 2
            assert (report["samples"], report["tokens"]) == (expected["samples"], expected["tokens"])
            assert report["codebook"] == pytest.approx(expected["codebook"], rel=1e-12)
            assert report["metrics"].keys() == expected["metrics"].keys()
            metrics, expected_metrics = dict(report["metrics"]), dict(expected["metrics"])
            if modality == "image":  # the paper's SSIM truncates to 8 bits, which turns the forward's float noise
                # in another batch composition into whole levels at a few pixels
                assert metrics.pop("ssim") == pytest.approx(expected_metrics.pop("ssim"), abs=1e-4)
            assert metrics == pytest.approx(expected_metrics, rel=1e-5)
        assert ranks[0][modality]["metrics"] == ranks[1][modality]["metrics"]  # reduced: bit-identical on every rank
    assert set(single["image"]["metrics"]) == {"utilization", "perplexity", "psnr", "ssim"}
    assert {"pesq_wb", "stoi", "mel_distance"} <= set(single["audio"]["metrics"])
    assert single["audio"]["unavailable"]["utmos"] == "unavailable (no --utmos-weights)"
    assert single["audio"]["unavailable"]["vuv_f1"] == "skipped (--skip)"


def test_max_samples_takes_the_first_samples_whatever_the_world_size(tiny_runs, demo_data):
    tokenizer = load_tokenizer(tiny_runs["image"])
    shards = _shards(demo_data, "image")
    keys = {}
    for world in (1, 3):
        keys[world] = [k for rank in range(world)
                       for batch in limited_eval_loader(tokenizer.config.data, shards, BATCH, rank, world, 10)
                       for k, m in zip(batch["key"], batch["mask"].tolist()) if m]
    assert len(keys[1]) == 10 and keys[3] == keys[1]
    with pytest.raises(ValueError, match="--max-samples=0"):
        limited_eval_loader(tokenizer.config.data, shards, BATCH, 0, 1, 0)


def _real_weights_present() -> bool:
    return all((weights_dir() / f).is_file() for f in (*LPIPS_FEATURE_FILES.values(), FID_INCEPTION_FILE))


@pytest.mark.slow
def test_eval_recon_tool_writes_json_and_markdown_with_real_or_unavailable_networks(tiny_runs, demo_data, tmp_path):
    out = tmp_path / "report.json"
    result = run_tool("eval_recon.py", "--checkpoint", str(tiny_runs["image"]), "--data", _shards(demo_data, "image"),
                      "--max-samples", "6", "--batch-size", "3", "--workers", "0", "--out", str(out))
    report = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert table in result.stdout and "| utilization |" in table and "| psnr |" in table
    assert report["samples"] == 6 and report["step"] == 7
    metrics = report["metrics"]
    assert 0 < metrics["utilization"] <= 1 and metrics["psnr"] > 0
    if _real_weights_present():  # real ImageNet networks: every metric computed
        assert {"lpips_vgg", "lpips_alex", "rfid"} <= set(metrics) and not report["unavailable"]
        assert metrics["rfid"] > 0 and 0 < metrics["lpips_vgg"] < 2 and 0 < metrics["lpips_alex"] < 2
    else:  # never faked with random weights
        assert {"lpips_vgg", "lpips_alex", "rfid"} <= set(report["unavailable"])
        assert not {"lpips_vgg", "lpips_alex", "rfid"} & set(metrics)


@pytest.mark.slow
def test_eval_recon_refuses_a_missing_explicit_weights_file(tiny_runs, demo_data, tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "vgg.pth"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_recon.py"),
                             "--checkpoint", str(tiny_runs["image"]), "--data", _shards(demo_data, "image"),
                             "--lpips-vgg", str(missing), "--max-samples", "2", "--workers", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"--lpips-vgg={missing}" in result.stderr and "simvq-fetch-weights" in result.stderr


@pytest.mark.slow
def test_codebook_report_counts_every_token_and_plots(tiny_runs, demo_data, tmp_path):
    out = tmp_path / "codebook"
    run_tool("codebook_report.py", "--checkpoint", str(tiny_runs["image"]), "--data", _shards(demo_data, "image"),
             "--max-samples", "5", "--batch-size", "4", "--workers", "0", "--out", str(out), "--no-progress")
    report = json.loads((out / "codebook_report.json").read_text())
    counts = torch.tensor(report["sorted_counts"])
    assert report["tokens"] == 5 * 16 * 16 == int(counts.sum()) and len(counts) == 256
    assert report["utilization"] == (counts > 0).sum().item() / 256
    assert (counts[:-1] >= counts[1:]).all()
    assert len(report["w_spectrum"]["singular_values"]) == 8 and report["w_spectrum"]["rank_fp32"] == 8
    for png in ("code_frequency.png", "w_spectrum.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
