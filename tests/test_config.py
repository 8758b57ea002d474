import pytest

from simvq_scale.config import Config, ConfigError, dump_config, load_config, micro_batch_and_accumulation


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_closest_valid_key(tmp_path):
    path = write(tmp_path, "quantizer:\n  codebok_size: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "quantizer.codebok_size" in message and str(path) in message and "codebook_size" in message


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'trian'.*'train'"):
        load_config(write(tmp_path, "trian:\n  steps: 3\n"))


def test_wrong_type_names_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps='many' should be int"):
        load_config(write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ConfigError, match="should be int, got bool"):
        load_config(overrides=["quantizer.codebook_size=true"])


def test_overrides_apply_after_the_file_with_yaml_typing(tmp_path):
    cfg = load_config(write(tmp_path, "quantizer:\n  codebook_size: 10\noptim:\n  lr: 1e-4\n"),
                      ["quantizer.codebook_size=262144", "optim.lr=2e-4", "quantizer.fsq.levels=[8,5,5]"])
    assert cfg.quantizer.codebook_size == 262144
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.quantizer.fsq.levels == [8, 5, 5]


@pytest.mark.parametrize("override, needle", [
    ("quantizer.codebook_size=0", "quantizer.codebook_size=0"),
    ("quantizer.kind=pq", "quantizer.kind='pq'"),
    ("train.global_batch=10", "train.global_batch=10 does not divide by the world size 4"),
    ("train.micro_batch=3", "train.micro_batch=3 does not divide the per-rank batch 64"),
    ("quantizer.shard.group=3", "quantizer.shard.group=3 must be a positive divisor of the world size 4"),
    ("quantizer.shard.group=rack", "quantizer.shard.group='rack'"),
])
def test_impossible_values_name_themselves(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override]).validate(world_size=4)
    assert needle in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["train.steps"])


def test_micro_batch_and_accumulation():
    assert micro_batch_and_accumulation(256, 0, 8) == (32, 1)
    assert micro_batch_and_accumulation(256, 8, 8) == (8, 4)


def test_dump_and_load_back_to_the_same_object(tmp_path):
    cfg = load_config(overrides=["quantizer.codebook_size=1048576", "quantizer.shard.group=node",
                                 "optim.betas=[0.9, 0.99]", "data.modality=audio"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(tmp_path / "config.yaml") != Config()


def test_every_shipped_config_loads_and_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs, "no configs/*.yaml found"
    for path in configs:
        load_config(path).validate(world_size=1)
