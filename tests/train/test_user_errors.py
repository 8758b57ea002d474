"""Errors a user can act on are one line naming the file, setting or path and what to do, with an exit code of
their own (README, "Exit codes"); --dry-run finds them too, before anything is built or written."""

import pytest

from simvq_scale.config import ConfigError, load_config
from tests.helpers import ROOT, one_error, tiny_overrides, train


@pytest.mark.slow
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "configs" / "image_demo.yaml").read_text().replace("  dim: 32\n", "  dim: [32\n"))
    with pytest.raises(ConfigError, match=rf"^{broken}:\d+:\d+: YAML syntax error: .* \(while parsing a flow "
                                          rf"sequence at line \d+\); fix the file there$"):
        load_config(broken)
    done = train(tmp_path / "run", extra=["--config", str(broken), "--dry-run"])  # the later --config wins
    assert f"error: {broken}:" in one_error(done, 2)


def test_an_override_that_is_not_yaml_and_an_empty_string_setting():
    with pytest.raises(ConfigError, match=r"--set data.train_shards=\{a,b: the value is not valid YAML"):
        load_config(overrides=["data.train_shards={a,b"])
    assert load_config(overrides=["data.val_shards="]).data.val_shards == ""


def test_the_heartbeat_must_fire_before_the_collective_timeout():
    with pytest.raises(ConfigError, match="train.heartbeat_timeout_s=3600.0 must be >= 0 .* below "
                                          "train.collective_timeout_s=1800.0"):
        load_config(overrides=["train.heartbeat_timeout_s=3600"]).validate()
    load_config(overrides=["train.heartbeat_timeout_s=0"]).validate()  # 0: no heartbeat


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_shards", "no_lpips_weights", "unwritable_out_dir"])
def test_dry_run_stops_a_config_that_cannot_train_with_one_line(demo_data, tmp_path, case):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run" if case == "unwritable_out_dir" else tmp_path / "run"
    more, code, needle = {
        "no_shards": ([f"data.train_shards={tmp_path}/shards/train-{{000..009}}.tar"], 3,
                      f"data.train_shards: shard pattern '{tmp_path}/shards/train-{{000..009}}.tar' matches no file"),
        "no_lpips_weights": (["loss.perceptual_weight=1.0", f"loss.perceptual_weights={tmp_path}/vgg.pth"], 4,
                             f"pretrained weights file not found: {tmp_path}/vgg.pth "
                             f"(setting: loss.perceptual_weights)"),
        "unwritable_out_dir": ([], 5, f"train.out_dir={out} cannot be created: {tmp_path}/a_file is not a writable "
                                      f"folder"),
    }[case]
    done = train(out, *tiny_overrides(demo_data, out), *more, extra=["--dry-run"])
    assert needle in one_error(done, code)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
