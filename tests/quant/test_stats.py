"""CodebookUsage window and figures, its all-reduce under gloo, its checkpoint state; W spectrum numbers."""

import math

import pytest
import torch

from simvq_scale.quant.stats import CodebookUsage, weight_spectrum
from tests.dist_utils import run_distributed


def test_figures_on_a_planted_index_set():
    usage = CodebookUsage(codebook_size=200, window_tokens=1000)
    # code 0 used 100 times, codes 1..99 once each: 100 of 200 codes used, 199 tokens
    usage.update(torch.cat([torch.zeros(100, dtype=torch.long), torch.arange(1, 100)]))
    f = usage.reduce()
    assert f["utilization"] == 0.5 and f["dead_codes"] == 100
    p = torch.tensor([100.0] + [1.0] * 99) / 199
    entropy = float(-(p * p.log()).sum())
    assert f["perplexity"] == pytest.approx(math.exp(entropy))
    assert f["entropy_normalized"] == pytest.approx(entropy / math.log(200))
    assert f["top1pct_share"] == pytest.approx(101 / 199)  # top 1% of 200 codes = 2 codes: 100 + 1 tokens


def test_window_forgets_old_steps_but_keeps_at_least_window_tokens():
    usage = CodebookUsage(codebook_size=10, window_tokens=6)
    usage.update(torch.tensor([0, 0, 0, 0]))
    usage.update(torch.tensor([1, 1, 1, 1]))
    assert usage.reduce()["utilization"] == 0.2  # 8 tokens: the first step is still needed to reach 6
    usage.update(torch.tensor([2, 2, 2, 2]))
    f = usage.reduce()
    assert f["utilization"] == 0.2 and f["window_tokens"] == 8  # code 0 forgotten: steps 2+3 cover 6 tokens
    assert usage.counts.tolist() == [0, 4, 4, 0, 0, 0, 0, 0, 0, 0]


def test_state_round_trip_restores_the_window():
    a = CodebookUsage(codebook_size=50, window_tokens=20)
    for step in range(6):
        a.update(torch.randint(50, (7,), generator=torch.Generator().manual_seed(step)))
    b = CodebookUsage(codebook_size=50, window_tokens=20)
    b.load_state_dict(a.state_dict())
    assert b.reduce() == a.reduce() and torch.equal(a.counts, b.counts)
    later = torch.arange(20)
    a.update(later)
    b.update(later)  # the restored window forgets exactly the same steps
    assert torch.equal(a.counts, b.counts)
    with pytest.raises(ValueError, match="cannot load"):
        CodebookUsage(codebook_size=60, window_tokens=20).load_state_dict(a.state_dict())


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_window_restored_on_the_cpu_forgets_its_steps_on_the_training_device(device):
    # --resume on a GPU: the state loads on the CPU, the next steps come on the device and push the restored
    # steps out of the window (this raised "found at least two devices" at the first step after resuming)
    a = CodebookUsage(codebook_size=50, window_tokens=20)
    for step in range(4):
        a.update(torch.randint(50, (7,), generator=torch.Generator().manual_seed(step)))
    b = CodebookUsage(codebook_size=50, window_tokens=20)
    b.load_state_dict(a.state_dict())
    later = torch.arange(14)
    a.update(later)
    b.update(later.to(device))  # forgets two of the restored steps
    assert b.tokens == a.tokens == 21 and len(b.steps) == len(a.steps) == 2
    assert {s.device.type for s in b.steps} == {b.counts.device.type} == {device}
    if device != "meta":  # meta tensors carry no values
        assert torch.equal(b.counts.cpu(), a.counts)


def _usage_on_rank(rank, world_size, tokens_per_rank):
    usage = CodebookUsage(codebook_size=32, window_tokens=1000)
    usage.update(tokens_per_rank[rank])
    return usage.reduce()


@pytest.mark.slow
def test_reduce_under_two_gloo_processes_equals_one_process_on_all_tokens():
    g = torch.Generator().manual_seed(0)
    tokens_per_rank = [torch.randint(0, 16, (40,), generator=g), torch.randint(10, 32, (30,), generator=g)]
    results = run_distributed(_usage_on_rank, 2, tokens_per_rank)
    alone = CodebookUsage(codebook_size=32, window_tokens=1000)
    alone.update(torch.cat(tokens_per_rank))
    expected = alone.reduce()
    assert expected["utilization"] > _usage_on_rank(0, 1, tokens_per_rank)["utilization"]  # ranks differ
    for r in results:
        assert r == pytest.approx(expected)


def test_weight_spectrum_of_a_matrix_of_known_rank():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    v = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5] + [0.0] * 11)
    w = u @ torch.diag(s) @ v.T
    spec = weight_spectrum(w)
    assert spec["rank_fp32"] == 5
    assert spec["rank_fp32"] == torch.linalg.matrix_rank(w).item()  # the same tolerance as torch's default
    assert spec["rank"] == 5  # 0.5 / 4 is above the default relative tolerance of 1e-2
    assert weight_spectrum(w, rank_rtol=0.6)["rank"] == 2  # only 4 and 3 exceed 0.6 * 4
    torch.testing.assert_close(spec["singular_values"], s, rtol=0, atol=1e-5)
    assert spec["frobenius_norm"] == pytest.approx(math.sqrt(16 + 9 + 4 + 1 + 0.25), rel=1e-5)
    p = s[:5] / s.sum()
    assert spec["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-4)
    assert weight_spectrum(torch.eye(8))["effective_rank"] == pytest.approx(8.0, rel=1e-5)
