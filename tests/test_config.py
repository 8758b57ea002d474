import pytest

from simvq_scale.config import Config, ConfigError, dump_config, load_config, micro_batch_and_accumulation
from tests.helpers import ROOT


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
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "no configs/*.yaml found"
    for path in configs:
        load_config(path).validate(world_size=1)


@pytest.mark.parametrize("old, new", [
    ("bias", "quantizer.simvq.bias"), ("train_codebook", "quantizer.simvq.train_codebook"),
    ("init_from_data", "quantizer.simvq.init_from_data"), ("ema_decay", "quantizer.vq_ema.decay"),
    ("ema_epsilon", "quantizer.vq_ema.epsilon"), ("fc_dim", "quantizer.fc.low_dim"),
    ("fsq_levels", "quantizer.fsq.levels"), ("lfq_entropy_weight", "quantizer.lfq.entropy_weight"),
    ("lfq_diversity_gamma", "quantizer.lfq.diversity_gamma"), ("lc_features", "quantizer.lc.features"),
])
def test_keys_of_the_flat_quantizer_layout_name_their_new_place(tmp_path, old, new):
    path = write(tmp_path, f"quantizer:\n  {old}: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert f"quantizer.{old} moved to {new}" in message and str(path) in message and "\n" not in message
    with pytest.raises(ConfigError, match=f"quantizer.{old} moved to {new}"):
        load_config(overrides=[f"quantizer.{old}=1"])


def test_each_kind_has_its_own_section_and_model_ema_decay_is_apart():
    cfg = load_config(overrides=["quantizer.kind=vq_ema", "quantizer.vq_ema.decay=0.9", "model.ema_decay=0.5",
                                 "quantizer.simvq.init_from_data=true", "quantizer.lfq.entropy_weight=0.2"])
    assert cfg.quantizer.options is cfg.quantizer.vq_ema and cfg.quantizer.vq_ema.decay == 0.9
    assert cfg.model.ema_decay == 0.5
    assert cfg.quantizer.simvq.init_from_data and cfg.quantizer.lfq.entropy_weight == 0.2
    assert load_config(overrides=["quantizer.kind=vq"]).quantizer.options is None


def _lc_file(tmp_path, shape):
    import numpy as np

    path = tmp_path / "features.npy"
    np.save(path, np.zeros(shape, dtype=np.float32))
    return str(path)


@pytest.mark.parametrize("overrides, needle", [
    (["quantizer.kind=fsq", "quantizer.codebook_size=100", "quantizer.fsq.levels=[4,4]"],
     "quantizer.fsq.levels=[4, 4] make 16 codes but quantizer.codebook_size=100"),
    (["quantizer.kind=fsq", "quantizer.codebook_size=8", "quantizer.fsq.levels=[8,1]"],
     "quantizer.fsq.levels=[8, 1] needs at least one level and every level >= 2"),
    (["quantizer.kind=lfq", "quantizer.codebook_size=1000"], "quantizer.codebook_size=1000 must be a power of 2"),
    (["quantizer.kind=lc"], "quantizer.lc.features is empty"),
    (["quantizer.kind=lc", "quantizer.lc.features=/nonexistent/f.npy"], "quantizer.lc.features='/nonexistent/f.npy'"),
    (["quantizer.kind=vq", "quantizer.shard.group=world"], "quantizer.kind='vq' has none to shard"),
    (["quantizer.simvq.train_codebook=true", "quantizer.shard.group=world"],
     "quantizer.simvq.train_codebook=true with quantizer.shard.group='world'"),
    (["quantizer.search_impl=cuda"], "quantizer.search_impl='cuda' is not auto|torch|triton"),
    (["quantizer.kind=vq_ema", "quantizer.vq_ema.decay=1.0"], "quantizer.vq_ema.decay=1.0 must be in (0, 1)"),
    (["quantizer.kind=fc", "quantizer.fc.low_dim=0"], "quantizer.fc.low_dim=0 must be > 0"),
    (["quantizer.beta=-1"], "quantizer.beta=-1.0 must be >= 0"),
])
def test_impossible_quantizer_values_fail_at_validate_in_one_line(overrides, needle):
    cfg = load_config(overrides=overrides)  # loading alone accepts them: the types are right
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=2)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lc_features_file_is_checked_for_its_shape_at_validate(tmp_path):
    good = _lc_file(tmp_path, (64, 12))
    load_config(overrides=["quantizer.kind=lc", "quantizer.codebook_size=64", f"quantizer.lc.features={good}"]).validate()
    with pytest.raises(ConfigError, match=r"holds an array of shape \(64, 12\); expected \(65, feature_dim\)"):
        load_config(overrides=["quantizer.kind=lc", "quantizer.codebook_size=65",
                               f"quantizer.lc.features={good}"]).validate()


def test_only_the_chosen_kinds_section_is_checked():
    # the audio configs set simvq options; switching the kind must not trip over another kind's section
    cfg = load_config(overrides=["quantizer.kind=simvq", "quantizer.fsq.levels=[4,4]", "quantizer.lfq.entropy_weight=-1",
                                 "quantizer.codebook_size=1000"])
    cfg.validate()


@pytest.mark.parametrize("overrides, needle", [
    (["model.image.channels=48"], "model.image.channels=48 * channel_mult=[1, 2, 2, 4] makes widths [48, 96, 192]; "
                                  "GroupNorm needs multiples of 32"),
    (["model.image.channel_mult=[]"], "model.image.channel_mult=[] must be a non-empty list of positive integers"),
    (["data.image_size=100"], "data.image_size=100 must be a positive multiple of 8, the encoder's downsampling"),
    (["model.discriminator.norm=group", "model.discriminator.channels=40"],
     "model.discriminator.channels=40 makes normalised widths [80, 160, 320]"),
    (["model.discriminator.norm=layer"], "model.discriminator.norm='layer' is not one of batch|group"),
    (["data.image_size=16", "model.image.channel_mult=[1]"],
     "model.discriminator.layers=3 halves data.image_size=16 to 2 pixels"),
    (["loss.perceptual_weight=-1"], "loss.perceptual_weight=-1.0 must be >= 0"),
    (["data.modality=audio", "model.audio.hop=256"],
     "model.audio.hop=256 must equal the product of model.audio.strides=[8, 5, 4, 2] (320)"),
    (["data.modality=audio", "model.audio.strides=[8, 0]"], "model.audio.strides=[8, 0] must be a non-empty list"),
    (["data.modality=audio", "model.audio.n_fft=1281"], "model.audio.n_fft=1281 and hop=320: the iSTFT head needs"),
    (["data.modality=audio", "model.audio.decoder_dim=100"],
     "model.audio.decoder_dim=100 with model.audio.prenet=true: the pre-net's GroupNorm needs a multiple of 32"),
    (["data.modality=audio", "model.audio.mrd_resolutions=[[1024, 256]]"],
     "model.audio.mrd_resolutions entry [1024, 256] must be [n_fft, hop, win]"),
    (["data.modality=audio", "model.audio.mrd_resolutions=[[512, 128, 1024]]"], "and win <= n_fft"),
    (["data.modality=audio", "model.audio.mpd_periods=[]"], "model.audio.mpd_periods=[] must be a non-empty list"),
    (["data.modality=audio", "loss.mel_n_mels=0"], "mel_n_mels=0 must be > 0"),
    (["data.modality=audio", "data.segment_seconds=0.02"],
     "data.segment_seconds=0.02 at data.sample_rate=24000 is 480 samples; the STFTs of model.audio.mrd_resolutions "
     "and loss.mel_n_fft need more than 1024"),
    (["data.modality=audio", "data.sample_rate=0"], "data.sample_rate=0 and data.segment_seconds=1.0 must be > 0"),
    (["data.workers=-1"], "data.workers=-1 and data.shuffle_buffer=2000 must be >= 0"),
    (["model.ema_decay=1.5"], "model.ema_decay=1.5 must be in [0, 1]"),
    (["loss.adv_weight=-0.1"], "loss.adv_weight=-0.1 and loss.disc_start=0 must be >= 0"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two values in [0, 1)"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas=[0.9, 1.0] must be two values in [0, 1)"),
    (["optim.weight_decay=-0.01"], "optim.weight_decay=-0.01 and optim.disc_lr=0.0 (0 = optim.lr) must be >= 0"),
    (["optim.schedule=linear"], "optim.schedule='linear' is not constant|cosine"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0 must be in [0, 1]"),
    (["optim.zero_stage_d=4"], "optim.zero_stage_g=0 and optim.zero_stage_d=4 must be DeepSpeed ZeRO stages 0|1|2|3"),
    (["train.keep_last=0"], "train.keep_last=0 must be >= 1"),
])
def test_impossible_model_data_loss_and_optim_values_fail_at_validate_in_one_line(overrides, needle):
    cfg = load_config(overrides=overrides)  # loading alone accepts them: the types are right
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_only_the_chosen_modalitys_sections_are_checked():
    # the image configs carry the default audio section and the audio configs the PatchGAN's: they are inert
    load_config(overrides=["model.audio.hop=256", "model.audio.decoder_dim=100"]).validate()
    load_config(overrides=["data.modality=audio", "model.image.channels=48", "model.discriminator.channels=40",
                           "data.image_size=100"]).validate()

