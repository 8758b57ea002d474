"""build_quantizer(cfg.quantizer): the one place a config kind becomes a quantizer module."""

from __future__ import annotations

from torch import nn

from simvq_scale.config import QUANTIZER_KINDS, QuantizerConfig
from simvq_scale.quant.base import Quantizer
from simvq_scale.quant.fc import FactorizedVQ
from simvq_scale.quant.fsq import FSQ
from simvq_scale.quant.lc import LC
from simvq_scale.quant.lfq import LFQ
from simvq_scale.quant.simvq import SimVQ
from simvq_scale.quant.vq import VQ
from simvq_scale.quant.vq_ema import VQEMA


def sharded_codebook(cfg: QuantizerConfig) -> nn.Module | None:
    """The frozen codebook split over the ranks of `cfg.shard.group`, or None when it is replicated.

    Must run on every rank in the same order (building the shard group is a collective).
    """
    if cfg.shard.group == "none":
        return None
    if cfg.kind != "simvq":
        raise ValueError(f"quantizer.shard.group={cfg.shard.group!r} shards the frozen SimVQ codebook; "
                         f"quantizer.kind={cfg.kind!r} has no shardable codebook (use shard.group=none)")
    if cfg.train_codebook:
        raise ValueError(f"quantizer.train_codebook=True with quantizer.shard.group={cfg.shard.group!r}: "
                         "a sharded codebook is frozen (regenerated from the seed); use shard.group=none")
    from simvq_scale.distributed import codebook_shard_group
    from simvq_scale.quant.sharded import ShardedCodebook

    group, group_rank, group_size = codebook_shard_group(cfg.shard.group)
    return ShardedCodebook(cfg.codebook_size, cfg.dim, cfg.seed, group, group_rank, group_size,
                           cfg.search_chunk, cfg.search_impl)


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    kind = cfg.kind
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"quantizer.kind={kind!r} is not one of {sorted(QUANTIZER_KINDS)}")
    codebook = sharded_codebook(cfg)
    search = dict(chunk_size=cfg.search_chunk, search_impl=cfg.search_impl)
    if kind == "simvq":
        return SimVQ(cfg.codebook_size, cfg.dim, beta=cfg.beta, seed=cfg.seed, bias=cfg.bias,
                     train_codebook=cfg.train_codebook, codebook=codebook, **search)
    if kind == "vq":
        return VQ(cfg.codebook_size, cfg.dim, beta=cfg.beta, **search)
    if kind == "vq_ema":
        return VQEMA(cfg.codebook_size, cfg.dim, beta=cfg.beta, decay=cfg.ema_decay, epsilon=cfg.ema_epsilon, **search)
    if kind == "fc":
        return FactorizedVQ(cfg.codebook_size, cfg.dim, fc_dim=cfg.fc_dim, beta=cfg.beta, **search)
    if kind == "fsq":
        quantizer = FSQ(cfg.fsq_levels, cfg.dim)
        if quantizer.codebook_size != cfg.codebook_size:
            raise ValueError(f"quantizer.fsq_levels={cfg.fsq_levels} make {quantizer.codebook_size} codes but "
                             f"quantizer.codebook_size={cfg.codebook_size}; make them agree")
        return quantizer
    if kind == "lfq":
        return LFQ(cfg.codebook_size, cfg.dim, entropy_weight=cfg.lfq_entropy_weight,
                   diversity_gamma=cfg.lfq_diversity_gamma, beta=cfg.beta)
    return LC(cfg.codebook_size, cfg.dim, cfg.lc_features, beta=cfg.beta, bias=cfg.bias, **search)
