"""The quantizer comparison (simvq-compare-quantizers): the plan each kind gets, refusals a user can act on, and
(slow) a real comparison of three quantizers on the demo shards whose table, CSV and plots are read back against
the runs' own files."""

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simvq_scale.eval.comparison import RunRecord, markdown_table, read_metrics
from simvq_scale.tools import compare_quantizers, make_lc_features
from tests.helpers import OFFLINE_EVAL, ROOT, TINY_COMPARISON

IMAGE_CONFIG = str(ROOT / "configs" / "image_demo.yaml")
AUDIO_CONFIG = str(ROOT / "configs" / "audio_demo.yaml")


@pytest.fixture(scope="module")
def tool():
    return compare_quantizers


def shard_sets(demo_data: dict, modality: str = "image") -> list[str]:
    root = Path(demo_data["dir"]).parent
    return [f"data.train_shards={root / demo_data[f'{modality}_train']}",
            f"data.val_shards={root / demo_data[f'{modality}_val']}"]


def dry_run(tool, capsys, *args: str) -> tuple[int, str, str]:
    rc = tool.main([*args, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def planned(out: str) -> dict[str, str]:
    """run name -> its plan lines (the summary line and its --set line)."""
    runs, name = {}, None
    for line in out.splitlines():
        if not line.startswith("  "):
            name = line.split(":")[0]
            runs[name] = line
        else:
            runs[name] += "\n" + line
    return runs


@pytest.mark.parametrize("k", [2, 16, 256, 1000, 1024, 3**7, 65536, 262144, 2**20, 2 * 3 * 5 * 7 * 11 * 13])
def test_fsq_levels_multiply_to_the_codebook_size(tool, k):
    levels = tool.fsq_levels_for(k)
    assert math.prod(levels) == k and all(2 <= level <= tool.FSQ_MAX_LEVEL for level in levels)


@pytest.mark.parametrize("k", [1, 1009, 2 * 67])
def test_fsq_levels_refuse_a_size_without_small_factors(tool, k):
    assert tool.fsq_levels_for(k) is None


def test_table1_plan_gives_each_kind_what_it_needs_at_its_size(tool, demo_data, tmp_path, capsys):
    rc, out, _ = dry_run(tool, capsys, "--config", IMAGE_CONFIG, "--out", str(tmp_path), "--codebook-size", "1000",
                         "--steps", "7", "--set", *shard_sets(demo_data))
    assert rc == 0
    runs = planned(out)
    assert list(runs) == list(tool.TABLE1_KINDS)
    assert "skipped: LFQ needs a power-of-two codebook size; K=1,000" in runs["lfq"]
    levels = yaml.safe_load(runs["fsq"].split(f"{tool.KEYS['fsq_levels']}=")[1].split("'")[0])
    assert math.prod(levels) == 1000
    assert f"{tool.KEYS['lc_features']}={tmp_path / 'lc_features'}" in runs["lc"]
    for name, text in runs.items():
        assert "K=1,000, 7 steps" in text
        if name != "lfq":
            assert f"{tool.KEYS['kind']}={name} " in text and f"train.out_dir={tmp_path / name}" in text


def test_kinds_cross_variants_and_steps_win_over_a_variant(tool, demo_data, tmp_path, capsys):
    rc, out, _ = dry_run(tool, capsys, "--config", IMAGE_CONFIG, "--out", str(tmp_path), "--kinds", "simvq,vq",
                         "--variant", "k512:quantizer.codebook_size=512 train.steps=99",
                         "--variant", "k2k:quantizer.codebook_size=2048", "--steps", "5",
                         "--set", *shard_sets(demo_data))
    assert rc == 0
    runs = planned(out)
    assert list(runs) == ["simvq-k512", "simvq-k2k", "vq-k512", "vq-k2k"]
    assert "K=512, 5 steps" in runs["vq-k512"] and "K=2,048, 5 steps" in runs["simvq-k2k"]


@pytest.mark.parametrize("decay, steps, share", [(0.999, 250, "78%"), (0.99, 250, "8%"), (0.9, 250, None)])
def test_short_runs_are_warned_that_their_ema_exports_are_mostly_initial_weights(tool, demo_data, tmp_path, capsys,
                                                                                decay, steps, share):
    rc, _, err = dry_run(tool, capsys, "--config", IMAGE_CONFIG, "--out", str(tmp_path), "--kinds", "simvq",
                         "--steps", str(steps), "--set", *shard_sets(demo_data), f"model.ema_decay={decay}")
    assert rc == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if share is None:
        assert warnings == []
    else:  # the share left, and a decay that leaves under 5% (the suggested one, applied)
        [warning] = warnings
        assert f"hold {share} of the initial weights after {steps} steps" in warning
        suggested = float(warning.split(f"{tool.KEYS['ema_decay']}=")[-1].rstrip(").").split(")")[0])
        assert suggested ** steps < 0.05 and suggested < decay


@pytest.mark.parametrize("args, message", [
    (["--kinds", "simvq,vqq"], "--kinds vqq: not a quantizer kind"),
    (["--variant", "k65k=quantizer.codebook_size"], "expected NAME:KEY=VALUE"),
    (["--variant", "a:quantizer.dim=8", "--variant", "a:quantizer.dim=16"], "run names appear twice: a"),
    (["--set", "quantizer.codebok_size=3"], "quantizer.codebok_size"),
    (["--val-shards", "/nonexistent/val-*.tar"], "--val-shards"),
])
def test_usage_errors_stop_before_anything_runs(tool, demo_data, tmp_path, capsys, args, message):
    rc = tool.main(["--config", IMAGE_CONFIG, "--out", str(tmp_path), "--set", *shard_sets(demo_data), *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_lc_features_of_the_wrong_size_are_refused(tool, demo_data, tmp_path, capsys):
    features = tmp_path / "features.npy"
    np.save(features, np.zeros((100, 4), dtype=np.float32))
    rc = tool.main(["--config", IMAGE_CONFIG, "--out", str(tmp_path / "out"), "--kinds", "lc", "--codebook-size", "256",
                    "--lc-features", str(features), "--set", *shard_sets(demo_data)])
    assert rc == 2 and f"--lc-features={features} holds shape (100, 4)" in capsys.readouterr().err


def test_a_run_folder_made_with_other_settings_is_refused(tool, demo_data, tmp_path, capsys):
    args = ["--config", IMAGE_CONFIG, "--out", str(tmp_path), "--kinds", "simvq", "--set", *shard_sets(demo_data)]
    runs, _ = tool.plan(tool.parse_args(args))
    earlier = runs[0].config
    earlier["quantizer"]["dim"] = 64
    (tmp_path / "simvq").mkdir()
    (tmp_path / "simvq" / "config.yaml").write_text(yaml.safe_dump(earlier))
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'simvq'} holds a run made with other settings: quantizer.dim (64 there, 32 now)" in err


def test_missing_matplotlib_is_reported_before_training(tool, demo_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rc = tool.main(["--config", IMAGE_CONFIG, "--out", str(tmp_path), "--kinds", "simvq",
                    "--set", *shard_sets(demo_data)])
    assert rc == 2 and "--no-plots" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_failed_run_is_named_in_the_table_and_the_exit_status(tool, demo_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    # an impossible model is refused while planning, before anything runs
    rc = tool.main(["--config", IMAGE_CONFIG, "--out", str(out), "--variant", "narrow:model.image.channels=16",
                    "--steps", "1", "--no-plots", "--set", *shard_sets(demo_data), *TINY_COMPARISON])
    assert rc == 2 and "model.image.channels=16" in capsys.readouterr().err and not out.exists()
    # a run that fails once started (its LPIPS weights file is missing: the trainer's preflight stops it)
    missing = tmp_path / "nowhere" / "lpips_vgg16_features.pth"
    rc = tool.main(["--config", IMAGE_CONFIG, "--out", str(out), "--variant",
                    f"lpips:loss.perceptual_weight=1 loss.perceptual_weights={missing}",
                    "--steps", "1", "--no-plots", "--set", *shard_sets(demo_data), *TINY_COMPARISON])
    captured = capsys.readouterr()
    log = out / "lpips" / "train.log"
    assert rc == 1 and "1 run(s) failed: lpips" in captured.err
    assert str(missing) in log.read_text() and str(missing) in captured.out  # the log's end shown on the console
    row = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("| lpips |"))
    assert f"failed: training exited with status 4; see {log}" in row and "| - |" in row


def _metrics_line(step: int, t: float, util: float) -> str:
    return json.dumps({"step": step, "time": t, "codebook/utilization": util}) + "\n"


def test_a_resumed_runs_repeated_steps_keep_their_last_line(tmp_path):
    # steps 2-6 logged, killed after the checkpoint at 4, resumed: 6 is logged again, then 8
    lines = [(2, 0.1), (4, 0.2), (6, 0.3), (6, 0.35), (8, 0.4)]
    (tmp_path / "metrics.jsonl").write_text("".join(_metrics_line(s, i, u) for i, (s, u) in enumerate(lines)))
    assert read_metrics(tmp_path)["codebook/utilization"] == [(2, 0.1), (4, 0.2), (6, 0.35), (8, 0.4)]


def test_the_table_shows_the_trainers_usage_and_the_ceiling_a_small_evaluation_set_puts_on_utilization(tmp_path):
    runs = []
    for name, k, tokens, train_util in (("small", 256, 4352, 0.9), ("large", 65536, 4352, 0.385)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(_metrics_line(10, 1.0, 0.1) + _metrics_line(20, 2.0, train_util))
        (run_dir / "eval.json").write_text(json.dumps({
            "samples": 17, "tokens": tokens, "codebook_size": k, "unavailable": {},
            "metrics": {"utilization": min(1.0, tokens / k), "perplexity": 10.0, "psnr": 20.0, "ssim": 0.5}}))
        runs.append(RunRecord(name, "simvq", k, 20, run_dir))
    table = markdown_table(runs, "image", "caption")
    rows = [[c.strip() for c in line.strip("| ").split("|")] for line in table.splitlines() if line.startswith("| ")]
    cells = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert cells["large"]["train utilization"] == "0.385" and cells["small"]["train utilization"] == "0.900"
    assert cells["large"]["utilization"] == "0.066"
    ceilings = [line for line in table.splitlines() if "cannot exceed" in line]
    assert ceilings == ["utilization over the evaluation set cannot exceed 0.066 at K = 65,536: its 4,352 tokens "
                        "are fewer than the codes (the train columns count the trainer's usage window)"]


def test_a_run_is_finished_only_with_an_export_written_after_its_last_step(tool, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_metrics_line(10, 1000.0, 0.5))
    assert not tool.training_done(tmp_path, 10)  # no export yet
    export = tmp_path / "generator_ema.pt"
    export.write_bytes(b"")
    os.utime(export, (999.0, 999.0))  # an export of an earlier checkpoint
    assert not tool.training_done(tmp_path, 10)
    os.utime(export, (1001.0, 1001.0))
    assert tool.training_done(tmp_path, 10) and not tool.training_done(tmp_path, 12)


def test_lc_pieces_are_the_token_patches_and_kmeans_reaches_a_fixed_point():
    make = make_lc_features
    from simvq_scale.config import load_config

    cfg = load_config(IMAGE_CONFIG, ["model.image.channel_mult=[1,2,2]"])  # 4x4 pixels per token
    x = torch.randn(2, 3, 8, 12)
    pieces = make.token_pieces(x, cfg)
    assert pieces.shape == (2, 2 * 3, 3 * 16)
    assert torch.equal(pieces[1, 5], x[1, :, 4:8, 8:12].reshape(-1))  # token row 1, column 2
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(300, 5, generator=generator)
    centres = make.kmeans(points, 7, 60, generator, log=lambda line: None)
    from simvq_scale.quant.nearest import nearest_code

    assign = nearest_code(points, centres)[1]
    for c in range(7):
        assert (assign == c).any()
        torch.testing.assert_close(centres[c], points[assign == c].mean(0), atol=1e-5, rtol=0)


def _value(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.slow
def test_three_quantizers_on_demo_shards_make_a_table_read_back_from_their_runs(tool, demo_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--config", IMAGE_CONFIG, "--out", str(out), "--kinds", "simvq,fsq,lc", "--codebook-size", "256",
            "--steps", "2", "--gpus", "0,1", "--set", *shard_sets(demo_data), *TINY_COMPARISON, *OFFLINE_EVAL]
    assert tool.main(args) == 0
    console = capsys.readouterr().out
    names = ["simvq", "fsq", "lc"]
    for name in names:
        assert f"[{name} " in console and "step 2/2" in console  # progress lines carry the run's name
    assert {json.loads((out / n / "run.json").read_text())["gpu"] for n in names} == {"0", "1"}  # both slots used
    features = next((out / "lc_features").glob("*.npy"))
    assert np.load(features).shape == (256, 3 * 2 * 2)  # K pieces of 2x2 RGB pixels

    table = (out / "table.md").read_text()
    cells_of = [[c.strip() for c in line.strip("| ").split("|")]
                for line in table.splitlines() if line.startswith("| ")]
    header, rows = cells_of[0], {cells[0]: cells for cells in cells_of[1:]}
    assert list(rows) == names
    assert "CPU" in table.splitlines()[0] and str(Path(demo_data["dir"]).parent / demo_data["image_val"]) in table
    csv_rows = {row["run"]: row for row in csv.DictReader((out / "table.csv").open())}
    assert list(csv_rows) == names
    for name in names:
        report = json.loads((out / name / "eval.json").read_text())
        assert report["step"] == 2 and report["samples"] == 8 and report["codebook_size"] == 256
        cells = dict(zip(header, rows[name]))
        for column, metric in (("utilization", "utilization"), ("perplexity", "perplexity"), ("PSNR", "psnr"),
                               ("SSIM", "ssim")):
            decimals = len(cells[column].split(".")[1])
            assert _value(cells[column]) == pytest.approx(report["metrics"][metric], abs=0.51 * 10**-decimals)
            assert float(csv_rows[name][metric]) == report["metrics"][metric]
        assert cells["LPIPS"] == cells["rFID"] == "unavailable" and csv_rows[name]["rfid"] == ""
        series = read_metrics(out / name)
        assert float(csv_rows[name]["train_utilization"]) == series["codebook/utilization"][-1][1]
        assert _value(cells["train utilization"]) == pytest.approx(series["codebook/utilization"][-1][1], abs=5e-4)
        assert [s for s, _ in series["loss/recon"]] == [1, 2]
    assert "levels [8, 8, 4]" in rows["fsq"][-1] and "simvq-make-lc-features" in rows["lc"][-1]
    assert "rFID unavailable: skipped (--skip)" in table
    for png in ("utilization.png", "recon_loss.png", "w_rank_norm.png"):  # simvq and lc have a W, fsq has none
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "W/rank" in read_metrics(out / "simvq") and "W/rank" not in read_metrics(out / "fsq")

    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for n in names for p in (out / n / "metrics.jsonl",
                                                                               out / n / "eval.json")}
    assert tool.main(args) == 0  # the same command again: everything is kept
    console = capsys.readouterr().out
    assert console.count("trained earlier to step 2: kept") == 3 and console.count("evaluated earlier: kept") == 3
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    assert (out / "table.md").read_text() == table
