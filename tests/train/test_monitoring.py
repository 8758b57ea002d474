"""TensorBoard monitoring read back as TensorBoard reads it: every tag of metrics.TAGS a run writes, the
custom-scalars layout, the HParams dashboard's metrics, the config text, validation (each sample once at any
world size), and the README's tag list."""

import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.dist_utils import run_distributed
from tests.helpers import ROOT, TINY_AUDIO, TINY_IMAGE, clean_env

# D from the first step; validation of 6 samples at both steps, so step 1 is a log step too; pictures at both
SHORT = ["train.steps=2", "train.log_every=2", "train.images_every=1", "loss.disc_start=0", "train.val_every=1",
         "train.val_samples=6"]


def run_demo(modality, demo_data, out):
    config, tiny = {"image": ("image_demo.yaml", TINY_IMAGE), "audio": ("audio_demo.yaml", TINY_AUDIO)}[modality]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / config),
           "--set", *tiny, *SHORT, f"data.train_shards={demo_data[modality + '_train']}",
           f"data.val_shards={demo_data[modality + '_val']}", f"train.out_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def accumulator(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "audio": 0,
                                                       "tensors": 0})
    acc.Reload()
    return acc


def session_groups(tb_dir):
    """What the HParams dashboard lists: its own handler over TensorBoard's own data provider."""
    from tensorboard import context
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tb_dir))
    mux.Reload()
    tb = base_plugin.TBContext(data_provider=MultiplexerDataProvider(mux, str(tb_dir)), multiplexer=mux,
                               logdir=str(tb_dir))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10,
                                               allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_UNKNOWN])
    groups = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    return groups.session_groups, mux.PluginRunToTagToContent("hparams")


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_a_run_writes_every_tag_the_layout_the_hparams_and_its_config(demo_data, tmp_path, modality):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    from simvq_scale.config import load_config, to_dict
    from simvq_scale.train import render
    from simvq_scale.train.metrics import HPARAMS_METRICS, TAGS, layout_for, run_conditions

    out = tmp_path / modality
    done = run_demo(modality, demo_data, out)
    cfg = load_config(out / "config.yaml")
    conditions = run_conditions(cfg, None)
    assert conditions == {modality, "simvq", "validation"}
    acc = accumulator(out / "tb")
    written = acc.Tags()
    where = {"scalar": "scalars", "histogram": "histograms", "image": "images", "audio": "audio"}

    # every tag the run's modality, quantizer and settings call for, under its kind; none of the others
    applying = [t for t in TAGS if t.applies(conditions)]
    for tag in applying:
        if tag.kind == "text":
            assert f"{tag.name}/text_summary" in written["tensors"], tag.name
        else:
            assert tag.name in written[where[tag.kind]], (tag.kind, tag.name)
    for tag in set(TAGS) - set(applying):
        assert tag.name not in written.get(where.get(tag.kind, "tensors"), []), tag.name
    assert {t.name for t in applying} >= {"W/spectrum", "codebook/rank_frequency", "W/rank", "W/rank_fp32"}
    if modality == "audio":
        clip = acc.Audio("recon/audio_0")[-1]  # input, 0.25 s of silence, reconstruction in one player
        assert clip.length_frames == 3 * 6000 and clip.sample_rate == 24000
        mel = acc.Images("recon/mel")[-1]
        assert mel.height > 4 * cfg.loss.mel_n_mels  # two clips, each input above its reconstruction, labelled
    assert len(acc.Images("W/spectrum")) == 2  # at both log steps (images_every=1)
    for tag in ("W/spectrum", "codebook/rank_frequency"):  # the curve and its red mark (rank_rtol; codes used)
        pixels = np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB"))
        assert (pixels == render._LINE).all(-1).sum() > 100 and (pixels == render._MARK).all(-1).sum() > 100, tag

    # a validation step is a log step (step 1 is not a multiple of log_every=2); its figures join the row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["val/samples"] for r in rows] == [6, 6]
    val_tags = [t.name for t in applying if t.name.startswith("val/") and t.name != "val/samples"]
    assert val_tags and all(math.isfinite(r[t]) for t in val_tags for r in rows)
    if modality == "image":
        assert 0 < rows[1]["val/recon"] < 2 and 0 < rows[1]["val/psnr"] < 100
    assert "validation at step 2:" in done.stdout and "over 6 samples" in done.stdout

    # the resolved config as text: the YAML of config.yaml
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```")) == to_dict(cfg)

    # the custom-scalars layout: "codebook health" first, every chart drawing exactly its written tags
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    expected = layout_for(conditions)
    assert [c.title for c in layout.category] == list(expected) and layout.category[0].title == "codebook health"
    health = {tag for charts in [expected["codebook health"]] for tags in charts.values() for tag in tags}
    assert health >= {"codebook/utilization", "codebook/perplexity", "codebook/dead_codes",
                      "codebook/top1pct_share", "W/rank", "W/effective_rank"}
    assert {"disc/logits_real", "disc/logits_fake", "opt/lr_d", "opt/grad_norm_d"} <= {
        tag for tags in expected["discriminator"].values() for tag in tags}
    for category in layout.category:
        for chart in category.chart:
            # the dashboard matches each entry as a regex from the start of every tag of the run
            drawn = sorted(t for t in written["scalars"] for regex in chart.multiline.tag if re.match(regex, t))
            assert drawn == sorted(expected[category.title][chart.title]), (chart.title, drawn)

    # the HParams dashboard: the config's values, and the last value of each metric
    groups, mux_content = session_groups(out / "tb")
    experiment = hparams_metadata.parse_experiment_plugin_data(mux_content["."]["_hparams_/experiment"])
    assert "quantizer.codebook_size" in {h.name for h in experiment.hparam_infos}
    metric_tags = [m.name.tag for m in experiment.metric_infos]
    assert metric_tags == [t for t in HPARAMS_METRICS if t in written["scalars"]]
    assert "codebook/utilization" in metric_tags and val_tags[0] in metric_tags
    (group,) = groups
    assert group.hparams["quantizer.codebook_size"].number_value == 256
    assert group.hparams["data.modality"].string_value == modality
    shown = {m.name.tag: (m.value, m.training_step) for m in group.metric_values}
    for tag in metric_tags:
        assert shown[tag] == (pytest.approx(rows[-1][tag], rel=1e-6), 2), tag


def validation_worker(rank, world_size, demo_data, samples):
    from simvq_scale.config import load_config
    from simvq_scale.modality import get_modality
    from simvq_scale.train.validation import Validation

    cfg = load_config(ROOT / "configs" / "image_demo.yaml",
                      [*TINY_IMAGE, f"data.val_shards={demo_data['image_val']}", "train.val_every=20",
                       f"train.val_samples={samples}", "train.steps=50"])
    lines = []
    validation = Validation(cfg, get_modality("image"), None, torch.device("cpu"), 2, rank, world_size, lines.append)
    batches = []

    def reconstruct(x):  # a stand-in generator: the figures then depend on the samples read alone
        batches.append(tuple(x.shape))
        return x.flip(-1) * 0.5

    rng = torch.get_rng_state()
    figures = validation.run(20, reconstruct, lines.append)
    return {"figures": figures, "batches": batches, "lines": lines, "rng_kept": torch.equal(rng, torch.get_rng_state()),
            "due": [s for s in range(1, 51) if validation.due(s)]}


@pytest.mark.slow
def test_validation_reads_the_first_samples_once_at_any_world_size(demo_data):
    from simvq_scale.config import load_config
    from simvq_scale.data import build_eval_loader

    samples = 11  # 3 ranks of micro-batch 2: ranges of 3, 4, 4 samples, padded batches on every rank
    data = load_config(ROOT / "configs" / "image_demo.yaml", TINY_IMAGE).data
    loader = build_eval_loader(data, demo_data["image_val"], 16, 0, 1)  # the whole set, in shard order
    x = torch.cat([b["x"][b["mask"]] for b in loader])[:samples]
    x_hat = x.flip(-1) * 0.5
    mse = ((x - x_hat) / 2).pow(2).flatten(1).mean(1)
    expected = {"val/recon": (x - x_hat).abs().flatten(1).mean(1).mean().item(),
                "val/psnr": (10 * torch.log10(1 / mse)).mean().item()}
    for world in (1, 2, 3):
        results = run_distributed(validation_worker, world, demo_data, samples, timeout_s=300)
        for r in results:
            assert r["figures"]["val/samples"] == samples
            for tag, value in expected.items():
                assert r["figures"][tag] == pytest.approx(value, rel=1e-5), (world, tag)
            assert r["batches"] == results[0]["batches"] and all(b[0] == 2 for b in r["batches"])
            assert r["due"] == [20, 40, 50]  # every val_every steps and at the last
            assert r["rng_kept"]  # training's random numbers (dropout) do not depend on validating
        assert any("validation at step 20:" in line for line in results[0]["lines"])
    few = run_distributed(validation_worker, 1, demo_data, 10_000, timeout_s=300)[0]
    assert "fewer than train.val_samples=10000" in few["lines"][0]


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.val_every=20", "data.val_shards="], "needs data.val_shards"),
    (["train.val_every=-20"], "train.val_every=-20 must be >= 0"),
])
def test_validation_settings_are_checked(overrides, needle):
    from simvq_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(ROOT / "configs" / "image_demo.yaml", overrides).validate()


def test_layout_and_hparams_name_known_tags_and_a_run_keeps_only_its_own():
    from simvq_scale.train.metrics import HPARAMS_METRICS, LAYOUT, TAG_NAMES, layout_for

    named = [tag for charts in LAYOUT.values() for tags in charts.values() for tag in tags]
    assert set(named) <= TAG_NAMES and set(HPARAMS_METRICS) <= TAG_NAMES
    audio = layout_for(frozenset({"audio", "vq"}))  # no validation, no W, no known GPU
    kept = {tag for charts in audio.values() for tags in charts.values() for tag in tags}
    assert "loss/mel" in kept and not {"val/mel", "val/psnr", "W/rank", "perf/mfu", "loss/recon"} & kept
    assert all(tags for charts in audio.values() for tags in charts.values())  # no empty chart left


def test_rank_frequency_is_a_thousand_sorted_points_of_a_million_counts():
    from simvq_scale.train.render import rank_frequency

    counts = torch.zeros(2**20, dtype=torch.long)
    counts[torch.randperm(2**20)[:5000]] = torch.randint(1, 1000, (5000,))
    ranks, frequency = rank_frequency(counts)
    assert 500 < len(ranks) <= 1024 and len(ranks) == len(frequency)
    assert ranks[0] == 1 and ranks[-1] == 2**20 and bool((ranks.diff() > 0).all())
    assert frequency[4] == counts.sort(descending=True).values[int(ranks[4]) - 1]  # the count at that rank
    assert frequency[0] == counts.max() and frequency[-1] == 0 and bool((frequency.diff() <= 0).all())


def test_readme_monitoring_section_names_every_tag_and_no_other():
    from simvq_scale.train.metrics import TAG_NAMES

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Monitoring"):]
    section = section[:section.index("\n## ")]
    named = set(re.findall(r"`([^`\s]+)`", section))
    missing = sorted(TAG_NAMES - named)
    assert not missing, f"README's Monitoring section does not name {missing}"
    unknown = sorted(n for n in named if re.fullmatch(r"[A-Za-z]\w*(/\w+)+", n) and n not in TAG_NAMES)
    assert not unknown, f"README's Monitoring section names tags that metrics.TAGS does not have: {unknown}"


def test_ticker_speaks_while_its_block_runs_and_stops_with_it():
    import time

    from simvq_scale.train.logging import Ticker

    lines = []
    with Ticker(lines.append, "first step: still compiling", every=0.02):
        time.sleep(0.3)
    said = len(lines)
    time.sleep(0.1)
    assert said >= 2 and len(lines) == said  # nothing after the block
    assert all(line.startswith("first step: still compiling (") and line.endswith(" s so far)") for line in lines)
