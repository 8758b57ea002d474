"""quantizer.simvq.standardize_tokens: running per-dimension moments over every rank's tokens, exact at a large
common offset; the standardized search spreads tokens that a plain search sends to one code; evaluation
never moves the moments; resume carries them."""

import pytest
import torch

from dist_utils import run_distributed
from simvq_scale.quant.simvq import SimVQ
from simvq_scale.quant.standardize import RunningStandardizer
from test_trainer import fit_worker, losses_by_step, tiny_overrides

DIM = 16


def offset_tokens(rank: int, n: int = 256, offset: float = 300.0) -> torch.Tensor:
    """Speech-like tokens: a large common offset with a spread of about 1e-3 per dimension."""
    g = torch.Generator().manual_seed(rank)
    return offset + 1e-3 * torch.randn(n, DIM, generator=g) * torch.linspace(0.5, 2.0, DIM)


def moments_worker(rank, world_size):
    s = RunningStandardizer(DIM, momentum=0.25)
    s.update(offset_tokens(rank))
    first = (s.mean.clone(), s.var.clone())
    s.update(offset_tokens(rank + 10))
    return first, (s.mean.clone(), s.var.clone())


@pytest.mark.parametrize("world_size", [1, 2])
def test_moments_are_every_ranks_tokens_exact_at_a_large_offset(world_size):
    results = run_distributed(moments_worker, world_size) if world_size > 1 else [moments_worker(0, 1)]
    batches = [torch.cat([offset_tokens(r + k) for r in range(world_size)]).double() for k in (0, 10)]
    mean0, var0 = batches[0].mean(0), batches[0].var(0, unbiased=False)
    mean1 = 0.75 * mean0 + 0.25 * batches[1].mean(0)
    var1 = 0.75 * var0 + 0.25 * batches[1].var(0, unbiased=False)
    for (m0, v0), (m1, v1) in results:  # every rank holds the same moments
        torch.testing.assert_close(m0.double(), mean0, rtol=0, atol=1e-4)
        torch.testing.assert_close(v0.double(), var0, rtol=0.02, atol=0)  # 1e-6 variances, cancellation-free
        torch.testing.assert_close(m1.double(), mean1, rtol=0, atol=1e-4)
        torch.testing.assert_close(v1.double(), var1, rtol=0.02, atol=0)


def quantizer(standardize: bool, offset: float = 300.0) -> SimVQ:
    q = SimVQ(4096, DIM, seed=0, search_impl="torch", init_from_data=True,
              standardize_momentum=0.1 if standardize else None)
    q.init_from_tokens(offset_tokens(0, offset=offset))
    return q


def test_standardized_search_spreads_tokens_that_drifted_together():
    # after the data-dependent start, the tokens shrink 100x around their mean (what SEANet's do while the
    # decoder learns the average spectrum): the codes, started on the old spread, take them all in one code.
    # (An offset of 3, so that fp32 still resolves the shrunk spread of 1e-5.)
    tokens = offset_tokens(1, offset=3.0)
    shrunk = tokens.mean(0) + 0.01 * (tokens - tokens.mean(0))
    plain, standardized = quantizer(False, offset=3.0).train(), quantizer(True, offset=3.0).train()
    for _ in range(100):  # the running moments follow the shrunk tokens (0.9^100 of the old ones is left)
        standardized(shrunk)
    assert plain(shrunk).indices.unique().numel() <= 2
    assert standardized(shrunk).indices.unique().numel() > 100


def test_evaluation_does_not_move_the_moments_and_decode_matches_forward():
    q = quantizer(True).eval()
    mean, var, updates = q.standardizer.mean.clone(), q.standardizer.var.clone(), int(q.standardizer.updates)
    z = offset_tokens(3)
    out = q(z)
    assert torch.equal(q.standardizer.mean, mean) and torch.equal(q.standardizer.var, var)
    assert int(q.standardizer.updates) == updates == 1
    assert torch.equal(out.z_q, q.decode_indices(out.indices))
    # a token's code does not depend on the rest of its batch
    assert torch.equal(q(z[:7]).indices, out.indices[:7])
    # the moments travel with the weights (the export and checkpoints carry them)
    assert {"standardizer.mean", "standardizer.var", "standardizer.updates"} <= set(q.state_dict())


def test_resume_with_standardized_tokens_reproduces_the_uninterrupted_run(demo_data, tmp_path):
    common = ["train.log_every=1", "train.ckpt_every=2", "quantizer.simvq.init_from_data=true",
              "quantizer.simvq.standardize_tokens=true"]
    straight = tiny_overrides(demo_data, tmp_path / "straight", *common, "train.steps=4")
    first_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.steps=2")
    second_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.steps=4")
    run_distributed(fit_worker, 2, [(straight, None), (first_half, None), (second_half, "auto")], timeout_s=600)
    a, b = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)
    assert a[3] != a[4]
