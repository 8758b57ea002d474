"""Typed run configuration: dataclasses <- YAML file <- dotted command-line overrides.

Strict by design: an unknown key names itself, its file and the closest valid key;
a value of the wrong type or an impossible value names the value. The resolved
config dumps to YAML and loads back to an equal object (lingua-style).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot describe a valid run."""


@dataclass
class ShardConfig:
    # Which ranks split the frozen codebook between them: "none" (replicated),
    # "world", "node" (ranks of one host), or an integer group size dividing the world.
    group: str = "none"


# Every quantizer kind, in one place. A kind's own options are the QuantizerConfig section of the same
# name (vq has none); quant/registry.py refuses a builder for a kind that is not listed here.
QUANTIZER_KINDS = ("simvq", "vq", "vq_ema", "fc", "fsq", "lfq", "lc")
SEARCH_IMPLS = ("auto", "torch", "triton")  # auto: the fused kernel on CUDA (quant/nearest.py)
SCHEDULES = ("constant", "cosine")  # of the learning rate after warm-up (train/engines.py)
ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class SimVQOptions:
    bias: bool = True  # bias b of the projection (codes C W^T + b), on as in the reference code
    train_codebook: bool = False  # ablation (paper Table 4): C trainable too
    # start W, b so the projected codes have the first batch's per-dimension mean and spread;
    # an encoder whose tokens barely differ at init (SEANet) otherwise sends every token to one code
    init_from_data: bool = False

    def check(self, q: "QuantizerConfig") -> None:
        require(not (self.train_codebook and q.shard.group != "none"),
                f"quantizer.simvq.train_codebook=true with quantizer.shard.group={q.shard.group!r}: a sharded "
                "codebook is frozen (regenerated from the seed); use shard.group=none")


@dataclass
class VQEMAOptions:
    decay: float = 0.99  # of the codes' running means (model.ema_decay is the generator's weight EMA)
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes

    def check(self, q: "QuantizerConfig") -> None:
        require(0.0 < self.decay < 1.0, f"quantizer.vq_ema.decay={self.decay} must be in (0, 1)")
        require(self.epsilon > 0, f"quantizer.vq_ema.epsilon={self.epsilon} must be > 0")


@dataclass
class FCOptions:
    low_dim: int = 8  # the l2-normalised low-dimensional space the codes live and are searched in

    def check(self, q: "QuantizerConfig") -> None:
        require(self.low_dim > 0, f"quantizer.fc.low_dim={self.low_dim} must be > 0")


@dataclass
class FSQOptions:
    levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])  # product = codebook_size

    def check(self, q: "QuantizerConfig") -> None:
        require(bool(self.levels) and all(level >= 2 for level in self.levels),
                f"quantizer.fsq.levels={self.levels} needs at least one level and every level >= 2")
        codes = math.prod(self.levels)
        require(codes == q.codebook_size, f"quantizer.fsq.levels={self.levels} make {codes} codes but "
                f"quantizer.codebook_size={q.codebook_size}; make them agree")


@dataclass
class LFQOptions:
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0

    def check(self, q: "QuantizerConfig") -> None:
        k = q.codebook_size
        require(k >= 2 and k & (k - 1) == 0,
                f"quantizer.codebook_size={k} must be a power of 2 (>= 2) for kind lfq (one sign bit per channel)")


@dataclass
class LCOptions:
    features: str = ""  # .npy of frozen code features (codebook_size x feature_dim)
    bias: bool = True  # bias of the projection, as SimVQ's

    def check(self, q: "QuantizerConfig") -> None:
        require(bool(self.features), "quantizer.lc.features is empty: kind lc needs a .npy file of code features")
        require(Path(self.features).is_file(),
                f"quantizer.lc.features={self.features!r}: no such .npy file of LC code features")
        import numpy as np  # reads the header only (memory-mapped); keeps this module torch-free

        try:
            shape = np.load(self.features, mmap_mode="r").shape
        except (OSError, ValueError) as error:
            raise ConfigError(f"quantizer.lc.features={self.features!r} is not a readable .npy array: "
                              f"{error}") from None
        require(len(shape) == 2 and shape[0] == q.codebook_size,
                f"quantizer.lc.features={self.features!r} holds an array of shape {shape}; expected "
                f"({q.codebook_size}, feature_dim) for quantizer.codebook_size={q.codebook_size}")


@dataclass
class QuantizerConfig:
    kind: str = "simvq"  # one of QUANTIZER_KINDS; its own options are the section of the same name
    codebook_size: int = 65536
    dim: int = 128
    beta: float = 0.25  # weight of |z - sg(q)|^2 (the encoder's commitment)
    seed: int = 0  # seeds the frozen Gaussian codebook C
    search_chunk: int = 8192  # codes per block of the chunked exact search
    search_impl: str = "auto"  # auto | torch | triton
    usage_window_tokens: int = 1_048_576  # tokens over which utilization is counted
    shard: ShardConfig = field(default_factory=ShardConfig)
    simvq: SimVQOptions = field(default_factory=SimVQOptions)
    vq_ema: VQEMAOptions = field(default_factory=VQEMAOptions)
    fc: FCOptions = field(default_factory=FCOptions)
    fsq: FSQOptions = field(default_factory=FSQOptions)
    lfq: LFQOptions = field(default_factory=LFQOptions)
    lc: LCOptions = field(default_factory=LCOptions)

    # keys of the former flat layout, refused by name with their new place
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "bias": "quantizer.simvq.bias (quantizer.lc.bias for kind lc)",
        "train_codebook": "quantizer.simvq.train_codebook",
        "init_from_data": "quantizer.simvq.init_from_data",
        "ema_decay": "quantizer.vq_ema.decay",
        "ema_epsilon": "quantizer.vq_ema.epsilon",
        "fc_dim": "quantizer.fc.low_dim",
        "fsq_levels": "quantizer.fsq.levels",
        "lfq_entropy_weight": "quantizer.lfq.entropy_weight",
        "lfq_diversity_gamma": "quantizer.lfq.diversity_gamma",
        "lc_features": "quantizer.lc.features",
    }

    @property
    def options(self):
        """The chosen kind's own section (None for vq, which has no options of its own)."""
        return getattr(self, self.kind, None)

    def validate(self) -> "QuantizerConfig":
        """Every impossible quantizer value as a one-line ConfigError; returns self. Only the chosen kind's
        section is checked (the others are inert); the shard group's fit to the world size: Config.validate."""
        require(self.kind in QUANTIZER_KINDS, f"quantizer.kind={self.kind!r} is not one of {list(QUANTIZER_KINDS)}")
        require(self.codebook_size > 0, f"quantizer.codebook_size={self.codebook_size} must be > 0")
        require(self.dim > 0, f"quantizer.dim={self.dim} must be > 0")
        require(self.beta >= 0, f"quantizer.beta={self.beta} must be >= 0")
        require(self.search_chunk > 0, f"quantizer.search_chunk={self.search_chunk} must be > 0")
        require(self.search_impl in SEARCH_IMPLS,
                f"quantizer.search_impl={self.search_impl!r} is not {'|'.join(SEARCH_IMPLS)}")
        require(self.usage_window_tokens > 0,
                f"quantizer.usage_window_tokens={self.usage_window_tokens} must be > 0")
        require(self.shard.group == "none" or self.kind == "simvq",
                f"quantizer.shard.group={self.shard.group!r} shards the frozen SimVQ codebook; "
                f"quantizer.kind={self.kind!r} has none to shard (use shard.group=none)")
        if self.options is not None:
            self.options.check(self)
        return self


@dataclass
class DataConfig:
    modality: str = "image"  # a registered modality (simvq_scale.modality): image | audio
    train_shards: str = ""  # brace pattern of .tar shards, e.g. "data/imagenet-train-{000000..001023}.tar"
    val_shards: str = ""
    image_size: int = 128
    random_resize: bool = False  # random-resized crop instead of a plain random crop
    # bilinear: full JPEG decode, PIL's antialiased bilinear (the reference's torchvision Resize; its images);
    # bicubic-draft: JPEG decoded at a reduced DCT scale, then bicubic: 2x faster decode, sharper images
    image_resample: str = "bilinear"
    sample_rate: int = 24000
    segment_seconds: float = 1.0
    random_gain_db: float = 0.0  # 0 disables; else uniform gain in [-x, +x] dB
    shuffle_buffer: int = 2000
    workers: int = 4
    seed: int = 0


@dataclass
class ImageModelConfig:
    # The VQGAN-style conv network of the SimVQ code: 128 px -> 16x16 tokens with 3 downsamples.
    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2


@dataclass
class DiscriminatorConfig:
    layers: int = 3  # PatchGAN depth
    channels: int = 64
    # batch (taming's BatchNorm, the reference's D) | group (per-sample GroupNorm; models/discriminators.py says
    # what each costs). batch: beside the reference on one H200 (photos, K=65,536, batch 64, seeds 0-7 a side),
    # utilization at step 25 0.106 against the GroupNorm D's 0.094 (the reference 0.111), level at step 50,
    # and a lower L1 at both (README "Against the reference")
    norm: str = "batch"


@dataclass
class AudioModelConfig:
    # WavTokenizer-style codec of the SimVQ code: SEANet encoder (EnCodec) -> tokens of width
    # quantizer.dim; Vocos backbone (pre-net + ConvNeXt) -> iSTFT head -> waveform of the input's length.
    encoder_filters: int = 32  # SEANet base width, doubled at every stride
    strides: list[int] = field(default_factory=lambda: [8, 5, 4, 2])  # product = samples per token (320)
    residual_layers: int = 1  # SEANet residual blocks per stride
    lstm_layers: int = 2
    causal: bool = True  # causal (left) padding in the encoder convs, as the reference config
    decoder_dim: int = 768
    intermediate_dim: int = 2304
    num_blocks: int = 12  # ConvNeXt blocks
    prenet: bool = True  # the reference's residual + attention pre-net in front of the ConvNeXt blocks
    prenet_dropout: float = 0.1
    n_fft: int = 1280
    hop: int = 320  # iSTFT hop; must equal the product of strides
    mpd_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    mpd_channels: list[int] = field(default_factory=lambda: [32, 128, 512, 1024, 1024])
    mrd_resolutions: list[list[int]] = field(  # (n_fft, hop, win) of WavTokenizer's multi-resolution D
        default_factory=lambda: [[1024, 256, 1024], [2048, 512, 2048], [512, 128, 512]])
    mrd_channels: int = 64


@dataclass
class ModelConfig:
    image: ImageModelConfig = field(default_factory=ImageModelConfig)
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    ema_decay: float = 0.999  # EMA of the generator weights, used for evaluation and export
    # compiled networks run their 2-D convolutions NHWC (inductor's layout forced; image batches channels_last):
    # cuDNN's bf16 kernels are NHWC, and NCHW graphs paid 13 ms of transposes per image step and 43 ms per audio
    # step (the MPD and MRD discriminators; README, Benchmarks). Parameters stay NCHW (DeepSpeed flattens them;
    # the graphs convert them as they cast to bf16). Eager runs ignore it.
    channels_last: bool = True


@dataclass
class LossConfig:
    recon_weight: float = 1.0  # L1 in pixel space
    perceptual_weight: float = 1.0  # LPIPS (VGG16); needs the converted weights file
    perceptual_weights: str = ""  # path of the LPIPS-VGG file; "" = the default folder of simvq-fetch-weights
    commit_weight: float = 1.0  # multiplies the quantizer's loss
    adv_weight: float = 0.1  # generator's adversarial weight (fixed, as the SimVQ config)
    adaptive_adv_weight: bool = False  # taming's adaptive weight instead of the fixed one
    disc_start: int = 0  # step at which the adversarial terms switch on
    # audio (the adversarial weight is adv_weight; the reference's commit weight 1000 is set in configs/audio_*)
    mel_weight: float = 45.0  # L1 between log-mel spectrograms
    feature_matching_weight: float = 1.0
    mel_n_fft: int = 1024
    mel_hop: int = 256
    mel_n_mels: int = 100


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    disc_lr: float = 0.0  # 0 = same as lr
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # 0 = no clipping
    # the quantizer's parameters (SimVQ's W and b) at lr * quantizer_lr_scale: codes that follow the encoder's
    # drifting tokens faster
    quantizer_lr_scale: float = 1.0
    # ZeRO-0 (gradients all-reduced, optimizer state whole on every rank) for both engines: ZeRO partitioning
    # would save these networks (~70M parameters: ~1 GiB of fp32 weights, gradients and Adam moments) under
    # 1 GiB per GPU, while DeepSpeed's ZeRO-1/2 step makes the host wait on the device 3-5 times per step.
    # image_262k, batch 64, one H200: 647 img/s at ZeRO-0 (engines.OptimizerStep clips) against 625 at 2/1.
    zero_stage_g: int = 0
    zero_stage_d: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    global_batch: int = 256
    micro_batch: int = 0  # per-rank micro-batch; 0 = global_batch / world_size (no accumulation)
    steps: int = 100_000
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 50
    images_every: int = 10  # log steps between pictures (reconstructions, code frequencies, W's spectrum)
    rank_rtol: float = 1e-2  # W/rank counts singular values above rank_rtol * the largest
    # Validation (val/ tags): every val_every steps and at the last step (each also a log step), the EMA
    # generator's reconstruction figures on the first val_samples samples of data.val_shards, each read once
    # across ranks; 0 = off.
    val_every: int = 0
    val_samples: int = 256
    ckpt_every: int = 1000
    keep_last: int = 3
    nan_policy: str = "skip"  # skip | stop
    compile: str = "auto"  # torch.compile the encoder, decoder and discriminator: auto (on CUDA) | true | false
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    # How long a collective waits for the slowest rank before torch.distributed aborts the run. It must
    # cover the longest time one rank works alone while the others wait (rank 0 writing the export, a
    # slow first data read, a checkpoint on a slow file system); a frozen rank is caught by the heartbeat.
    collective_timeout_s: float = 1800.0
    # A rank whose heartbeat (a thread reporting its step through the rendezvous store) stays silent this
    # long is named by the others, which then stop with exit code 7; 0 switches the heartbeat off.
    heartbeat_timeout_s: float = 120.0


@dataclass
class Config:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: int = 1) -> "Config":
        """Check values that types cannot; returns self so calls chain."""
        q, t = self.quantizer.validate(), self.train
        from simvq_scale.modality import get_modality  # the registry of modalities (lazy: it imports this module)

        get_modality(self.data.modality).check_config(self)  # its model, data and loss keys
        d, o, loss = self.data, self.optim, self.loss
        require(d.workers >= 0 and d.shuffle_buffer >= 0,
                f"data.workers={d.workers} and data.shuffle_buffer={d.shuffle_buffer} must be >= 0")
        require(0.0 <= self.model.ema_decay <= 1.0, f"model.ema_decay={self.model.ema_decay} must be in [0, 1]")
        require(min(loss.commit_weight, loss.adv_weight) >= 0 and loss.disc_start >= 0,
                f"loss.commit_weight={loss.commit_weight}, loss.adv_weight={loss.adv_weight} and "
                f"loss.disc_start={loss.disc_start} must be >= 0")
        require(o.lr > 0 and o.quantizer_lr_scale > 0, f"optim.lr={o.lr} and optim.quantizer_lr_scale="
                f"{o.quantizer_lr_scale} must be > 0")
        require(o.grad_clip >= 0 and o.warmup_steps >= 0,
                f"optim.grad_clip={o.grad_clip} and optim.warmup_steps={o.warmup_steps} must be >= 0")
        require(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
                f"optim.betas={o.betas} must be two values in [0, 1) (AdamW's beta1, beta2)")
        require(o.weight_decay >= 0 and o.disc_lr >= 0,
                f"optim.weight_decay={o.weight_decay} and optim.disc_lr={o.disc_lr} (0 = optim.lr) must be >= 0")
        require(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is not {'|'.join(SCHEDULES)}")
        require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
        require(o.zero_stage_g in ZERO_STAGES and o.zero_stage_d in ZERO_STAGES,
                f"optim.zero_stage_g={o.zero_stage_g} and optim.zero_stage_d={o.zero_stage_d} must be DeepSpeed ZeRO "
                f"stages {'|'.join(map(str, ZERO_STAGES))}")
        require(t.keep_last >= 1, f"train.keep_last={t.keep_last} must be >= 1")
        require(t.global_batch > 0, f"train.global_batch={t.global_batch} must be > 0")
        require(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
        require(t.precision in ("auto", "bf16", "fp32"), f"train.precision={t.precision!r} is not auto|bf16|fp32")
        require(t.nan_policy in ("skip", "stop"), f"train.nan_policy={t.nan_policy!r} is not skip|stop")
        require(t.compile in ("auto", "true", "false"), f"train.compile={t.compile!r} is not auto|true|false")
        require(t.compile_mode in ("default", "reduce-overhead", "max-autotune"),
                f"train.compile_mode={t.compile_mode!r} is not default|reduce-overhead|max-autotune")
        require(t.log_every > 0 and t.ckpt_every > 0 and t.images_every > 0,
                f"train.log_every={t.log_every}, ckpt_every={t.ckpt_every} and images_every={t.images_every} "
                "must be > 0")
        require(0.0 < t.rank_rtol < 1.0, f"train.rank_rtol={t.rank_rtol} must be in (0, 1)")
        require(t.val_every >= 0 and t.val_samples > 0,
                f"train.val_every={t.val_every} must be >= 0 (0 = off) and train.val_samples={t.val_samples} > 0")
        require(not t.val_every or self.data.val_shards, f"train.val_every={t.val_every} needs data.val_shards "
                "(set the validation shards, or train.val_every=0 to switch validation off)")
        require(t.collective_timeout_s > 0, f"train.collective_timeout_s={t.collective_timeout_s} must be > 0")
        require(0 <= t.heartbeat_timeout_s < t.collective_timeout_s,
                f"train.heartbeat_timeout_s={t.heartbeat_timeout_s} must be >= 0 (0 = off) and below "
                f"train.collective_timeout_s={t.collective_timeout_s}, or a frozen rank is only caught by the latter")
        shard_group_size(q.shard.group, world_size)
        micro_batch_and_accumulation(t.global_batch, t.micro_batch, world_size)
        return self


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def shard_group_size(group: str, world_size: int, local_world_size: int | None = None) -> int:
    """Ranks per codebook-shard group for `quantizer.shard.group` (1 = replicated)."""
    if group == "none":
        return 1
    if group == "world":
        return world_size
    if group == "node":
        return local_world_size or world_size
    try:
        size = int(group)
    except ValueError:
        raise ConfigError(f"quantizer.shard.group={group!r} is not none|world|node|<integer>") from None
    require(size > 0 and world_size % size == 0,
            f"quantizer.shard.group={size} must be a positive divisor of the world size {world_size}")
    return size


def micro_batch_and_accumulation(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, gradient-accumulation steps) that make up `global_batch`."""
    require(global_batch % world_size == 0,
            f"train.global_batch={global_batch} does not divide by the world size {world_size}")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    require(micro > 0 and per_rank % micro == 0,
            f"train.micro_batch={micro_batch} does not divide the per-rank batch {per_rank} "
            f"(global_batch {global_batch} / world size {world_size})")
    return micro, per_rank // micro


# ---------------------------------------------------------------- loading and dumping

# The run configs the package ships as package data; a checkout's top-level configs/ is a link to this folder.
PACKAGED_CONFIGS = Path(__file__).parent / "configs"
CONFIG_HELP = "YAML run config: a file, or a packaged config by name (e.g. image_demo, audio_262k)"


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def config_file(name_or_path: str | Path) -> Path:
    """The file a --config names: a path that exists wins; else a bare name (`image_demo` or `image_demo.yaml`)
    is the packaged config of that name, so an installed package runs its configs from any directory."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) != 1:
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return packaged if packaged.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file at `path` (or a packaged config's name) <- `overrides` ("a.b=value" strings)."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = config_file(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            packaged = (f"; or name a packaged config: {', '.join(packaged_config_names())}"
                        if isinstance(e, FileNotFoundError) else "")
            raise ConfigError(f"cannot read config file {path}: {e.strerror}{packaged}") from None
        raw = _parse_yaml(text, source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(Config, raw, source)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        opened = getattr(e, "context_mark", None)
        context = f" ({e.context} at line {opened.line + 1})" if opened is not None and e.context else ""
        raise ConfigError(f"{where}: YAML syntax error: {problem}{context}; fix the file there") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); put a string that starts "
                          f"with {{ [ or contains ': ' in YAML quotes inside the shell's") from None


def from_dict(cls: type, raw: dict[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    moved = getattr(cls, "MOVED_KEYS", {})
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key in moved:
            raise ConfigError(f"{source}: {dotted} moved to {moved[key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown config key {dotted!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, source, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, dotted: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted} must be a section (mapping), got {value!r}")
        return from_dict(tp, value, source, dotted + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, source, dotted)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {dotted} must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, v, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        return str(value).lower()  # YAML 1.1 reads on/off/yes/no as booleans: train.compile: on -> "true"
    if tp is str and isinstance(value, (int, float)):
        return str(value)  # e.g. shard.group: 8
    if tp is str and value is None:
        return ""  # `key:` in YAML or `--set key=` leaves a string setting empty
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {dotted}={value!r} should be {tp.__name__}, got {type(value).__name__}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dotted_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: value} ("quantizer.shard.group": ...); lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
