"""Every quantizer kind through the registry: the shared interface, gradients, index round trips, VQ-EMA under gloo."""

import numpy as np
import pytest
import torch

from simvq_scale.config import QUANTIZER_KINDS, ConfigError, FSQOptions, LCOptions, QuantizerConfig
from simvq_scale.quant import build_quantizer
from simvq_scale.quant.fsq import FSQ
from simvq_scale.quant.lfq import EXACT_ENTROPY_MAX_BITS, LFQ
from simvq_scale.quant.vq_ema import VQEMA
from tests.dist_utils import run_distributed

K, DIM = 64, 16


@pytest.fixture
def lc_features(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.random.default_rng(0).standard_normal((K, 12)).astype(np.float32))
    return str(path)


def make(kind: str, lc_features: str = ""):
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(kind=kind, codebook_size=K, dim=DIM, fsq=FSQOptions(levels=[4, 4, 4]),
                                           lc=LCOptions(features=lc_features), search_chunk=16, search_impl="torch"))


@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_interface_shapes_range_and_decode(kind, lc_features):
    q = make(kind, lc_features)
    assert q.codebook_size == K and q.dim == DIM
    z = torch.randn(3, 5, DIM)
    out = q(z)
    assert out.z_q.shape == z.shape and out.z_q.dtype == z.dtype
    assert out.indices.shape == (3, 5) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < K
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.stats.values())
    torch.testing.assert_close(q.decode_indices(out.indices), out.z_q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["simvq", "vq", "vq_ema", "lc"])
def test_straight_through_gradient_is_identity_for_full_dim_codes(kind, lc_features):
    q = make(kind, lc_features)
    z = torch.randn(4, DIM, requires_grad=True)
    upstream = torch.randn(4, DIM)
    (q(z).z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)


def _relaxed(q, z):
    """Each projection quantizer with its rounding removed: the STE gradient must equal this one's."""
    if isinstance(q, FSQ):
        return q.up(q.bound(q.down(z)) / q.half_width)
    if isinstance(q, LFQ):
        return q.up(q.down(z))
    return q.up(torch.nn.functional.normalize(q.down(z), dim=-1))  # FC


@pytest.mark.parametrize("kind", ["fc", "fsq", "lfq"])
def test_straight_through_gradient_of_projection_quantizers(kind):
    q = make(kind)
    z = torch.randn(4, DIM, requires_grad=True)
    upstream = torch.randn(4, DIM)
    (q(z).z_q * upstream).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (_relaxed(q, z_ref) * upstream).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer", [FSQ([8, 5, 3, 2], DIM), LFQ(256, DIM)], ids=["fsq", "lfq"])
def test_index_round_trip_over_the_whole_implicit_codebook(quantizer):
    every = torch.arange(quantizer.codebook_size)
    codes = quantizer.indices_to_codes(every)
    assert torch.unique(codes, dim=0).shape[0] == quantizer.codebook_size  # a bijection onto the grid
    assert torch.equal(quantizer.codes_to_indices(codes), every)
    assert codes.abs().max() <= 1


def test_fsq_forward_indices_name_the_grid_point_it_rounded_to():
    q = FSQ([8, 5, 3], DIM)
    z = torch.randn(200, DIM) * 3
    out = q(z)
    grid = q.bound(q.down(z)).round() / q.half_width
    torch.testing.assert_close(q.indices_to_codes(out.indices), grid.detach(), rtol=0, atol=0)
    assert len(out.indices.unique()) > 20  # scaled inputs reach many grid points, not one corner


def test_lfq_rejects_codebook_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="1000"):
        LFQ(1000, DIM)


def test_lfq_exact_codebook_entropy_matches_brute_force_and_factorized_is_an_upper_bound():
    q = LFQ(16, DIM, temperature=1.0)
    x = torch.randn(50, 4)
    per_sample, codebook = q.entropies(x)
    codes = q.indices_to_codes(torch.arange(16))
    p = torch.softmax(2 * x @ codes.T, dim=-1)
    torch.testing.assert_close(per_sample, -(p * p.log()).sum(-1).mean())
    avg = p.mean(0)
    torch.testing.assert_close(codebook, -(avg * avg.log()).sum())
    p_plus = torch.sigmoid(4 * x).mean(0)
    factorized = -(p_plus * p_plus.log() + (1 - p_plus) * (1 - p_plus).log()).sum()
    assert factorized >= codebook - 1e-6
    assert q.bits <= EXACT_ENTROPY_MAX_BITS


def test_lc_missing_or_misshapen_features_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(ConfigError, match="nope.npy"):
        build_quantizer(QuantizerConfig(kind="lc", codebook_size=K, dim=DIM, lc=LCOptions(features=str(missing))))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((K + 1, 4), dtype=np.float32))
    with pytest.raises(ConfigError, match="wrong.npy.*65, 4"):
        build_quantizer(QuantizerConfig(kind="lc", codebook_size=K, dim=DIM, lc=LCOptions(features=str(wrong))))


def test_lc_codebook_is_frozen_and_only_the_projection_trains(lc_features):
    q = make("lc", lc_features)
    assert [name for name, p in q.named_parameters()] == ["proj.weight", "proj.bias"]
    assert q.proj.in_features == 12 and "codebook.weight" not in q.state_dict()


def test_build_rejects_mismatched_fsq_levels_and_sharding_a_baseline():
    with pytest.raises(ConfigError, match="fsq.levels"):
        build_quantizer(QuantizerConfig(kind="fsq", codebook_size=100, fsq=FSQOptions(levels=[4, 4])))
    cfg = QuantizerConfig(kind="vq", codebook_size=K, dim=DIM)
    cfg.shard.group = "world"
    with pytest.raises(ConfigError, match="'vq'"):
        build_quantizer(cfg)


def _ema_after_one_step(rank, world_size, z, state):
    q = VQEMA(K, DIM, decay=0.9, epsilon=1e-3, search_impl="torch")
    q.load_state_dict(state)
    q.train()
    per_rank = z.shape[0] // world_size
    out = q(z[rank * per_rank : (rank + 1) * per_rank])
    return {"state": q.state_dict(), "indices": out.indices}


@pytest.mark.slow
def test_vq_ema_update_on_two_gloo_ranks_equals_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    reference = VQEMA(K, DIM, decay=0.9, epsilon=1e-3, search_impl="torch")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    assert set(state) == {"embedding", "cluster_size", "embedding_sum"}  # all persistent: they checkpoint
    z = torch.randn(40, DIM)
    single = _ema_after_one_step(0, 1, z, state)
    results = run_distributed(_ema_after_one_step, 2, z, state)
    assert torch.equal(torch.cat([r["indices"] for r in results]), single["indices"])
    for r in results:
        for key in state:
            torch.testing.assert_close(r["state"][key], single["state"][key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single["state"]["embedding"], state["embedding"])  # the update did something


def test_every_declared_kind_has_exactly_one_registered_builder():
    from simvq_scale.quant import register_quantizer, registered_kinds

    assert sorted(registered_kinds()) == sorted(QUANTIZER_KINDS)
    with pytest.raises(ValueError, match="'pq' is not declared in config.QUANTIZER_KINDS"):
        register_quantizer("pq")
    with pytest.raises(ValueError, match="'vq' is registered twice"):
        register_quantizer("vq")(lambda cfg: None)


@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_search_fallbacks_counter_is_a_device_buffer_outside_checkpoints(kind, lc_features):
    q = make(kind, lc_features)
    assert q.search_fallbacks.dtype == torch.int64 and q.search_fallbacks.dim() == 0
    assert "search_fallbacks" not in q.state_dict()
    q(torch.randn(8, DIM))
    assert int(q.search_fallbacks) == 0  # the torch search has no fallback; the fused one adds its count


def test_data_dependent_start_is_simvqs_option_only():
    cfg = QuantizerConfig(kind="simvq", codebook_size=K, dim=DIM)
    cfg.simvq.init_from_data = True
    assert build_quantizer(cfg).init_from_data
    cfg.kind = "vq"  # the simvq section is inert for another kind
    vq = build_quantizer(cfg)
    assert not vq.init_from_data
    with pytest.raises(TypeError, match="VQ has no data-dependent start"):
        vq.init_from_tokens(torch.zeros(4, DIM))
