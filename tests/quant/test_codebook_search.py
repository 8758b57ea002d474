import torch

from simvq_scale.quant.codebook import ROWS_PER_BLOCK, gaussian_rows, shard_range
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.search import SCORE_BLOCK_ELEMENTS, nearest_code_torch


def fp64_argmin(z, codes):
    d = (codes.double() ** 2).sum(1) - 2 * z.double() @ codes.double().T
    return d.min(dim=1)


def test_codebook_rows_identical_for_any_split():
    k, d = 2 * ROWS_PER_BLOCK + 123, 8
    whole = gaussian_rows(7, k, d)
    for parts in (2, 3, 5):
        pieces = [gaussian_rows(7, k, d, *shard_range(k, s, parts)) for s in range(parts)]
        assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(gaussian_rows(7, k, d, 100, 5000), whole[100:5000])
    assert not torch.equal(gaussian_rows(8, k, d), whole)  # the seed matters
    assert abs(whole.std().item() - d**-0.5) < 0.02  # N(0, d^-1/2 std) as the reference init


def test_shard_range_covers_uneven_codebooks_once():
    for k, p in [(1001, 3), (10, 4), (7, 7), (3, 4)]:
        ranges = [shard_range(k, s, p) for s in range(p)]
        assert ranges[0][0] == 0 and ranges[-1][1] == k
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_search_matches_fp64_bruteforce_for_uneven_chunks():
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(500, 16, generator=g), torch.randn(3001, 16, generator=g)
    ref_d, ref_i = fp64_argmin(z, codes)
    d, i = nearest_code_torch(z, codes, chunk_size=256)  # 3001 is no multiple of 256
    chosen = ((codes.double()[i] ** 2).sum(1) - 2 * (z.double() * codes.double()[i]).sum(1))
    # exact up to fp32 rounding of the distances: any disagreement must be a near-tie
    assert torch.all(chosen - ref_d <= 1e-5 * ref_d.abs().clamp_min(1))
    assert (i == ref_i).float().mean() > 0.99
    assert torch.allclose(d.double(), ref_d, atol=1e-4)


def test_planted_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(1000, 8, generator=g)
    codes[700] = codes[3]  # exact duplicates on different chunks
    codes[999] = codes[3]
    z = codes[[3, 3, 3]] + 1e-3 * torch.randn(3, 8, generator=g)
    _, i = nearest_code_torch(z, codes, chunk_size=128)
    assert i.tolist() == [3, 3, 3]


def test_search_under_bf16_autocast_stays_fp32():
    g = torch.Generator().manual_seed(2)
    z, codes = torch.randn(300, 32, generator=g), torch.randn(777, 32, generator=g)
    plain = nearest_code(z, codes, chunk_size=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = nearest_code(z.bfloat16().float(), codes, chunk_size=100)
        auto_same_input = nearest_code(z, codes, chunk_size=100)
    assert auto_same_input[0].dtype == torch.float32
    assert torch.equal(auto_same_input[1], plain[1])
    assert torch.equal(auto_same_input[0], plain[0])
    assert auto[1].shape == plain[1].shape


def test_search_memory_is_bounded_by_the_score_block():
    # the largest temporary is one tokens x codes block of at most SCORE_BLOCK_ELEMENTS floats,
    # whatever N and K: 16,384 tokens x 1,048,576 codes would be 64 GiB as one matrix
    from torch.profiler import ProfilerActivity, profile

    z, codes = torch.randn(4096, 16), torch.randn(40000, 16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nearest_code_torch(z, codes, chunk_size=8192)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest <= SCORE_BLOCK_ELEMENTS * 4 * 1.1
    assert biggest < z.shape[0] * codes.shape[0] * 4  # no N x K matrix


def test_bad_shapes_and_impl_are_refused():
    import pytest

    with pytest.raises(ValueError, match=r"\(N, d\)"):
        nearest_code_torch(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="impl 'fast'"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 3), impl="fast")
