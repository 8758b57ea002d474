"""Codebook-sharded search: key packing, exactness and W equivalence on 1-4 real gloo processes, failures.

Process start costs seconds on this machine, so one spawn per world size runs every
distributed case (`_worker`) and the tests read its cached results.
"""

import datetime
import functools
import time

import pytest
import torch
import torch.distributed as dist

from simvq_scale.distributed import codebook_shard_group
from simvq_scale.quant import sharded
from simvq_scale.quant.codebook import gaussian_rows, shard_range
from simvq_scale.quant.nearest import nearest_code
from simvq_scale.quant.sharded import (
    MAX_CODEBOOK_SIZE,
    ShardedCodebook,
    ShardedSearchError,
    pack_keys,
    sharded_nearest,
    unpack_index,
)
from simvq_scale.quant.simvq import LocalCodebook, SimVQ
from simvq_scale.tools.search_check import check_main, check_token_counts, check_tokens, planted_codes
from tests.dist_utils import run_distributed

# ---------------------------------------------------------------- key packing


def _canonical(value: float, index: int) -> tuple[float, int]:
    value = float("inf") if value != value else value  # NaN never wins
    return (value + 0.0, index)  # -0.0 ties with +0.0


def _sign(x) -> int:
    return (x > 0) - (x < 0)


def test_key_order_is_distance_then_index_for_special_values():
    values = [float("-inf"), -3.4e38, -3.5, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.5, 3.4e38, float("inf"),
              float("nan"), -float("nan")]
    indices = [0, 5, 2**31 - 1, 2**31, MAX_CODEBOOK_SIZE - 1]
    pairs = [(v, i) for v in values for i in indices]
    keys = pack_keys(torch.tensor([v for v, _ in pairs], dtype=torch.float32),
                     torch.tensor([i for _, i in pairs], dtype=torch.int64)).tolist()
    for a, key_a in zip(pairs, keys):
        for b, key_b in zip(pairs, keys):
            ca, cb = _canonical(*a), _canonical(*b)
            assert _sign(key_a - key_b) == _sign((ca > cb) - (ca < cb)), (a, b)


def test_key_order_on_random_distances_and_round_trip():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    distances = torch.randn(n, generator=generator) * 10.0 ** torch.randint(-30, 30, (n,), generator=generator)
    copies = torch.arange(0, n - 1, 7)
    distances[copies] = distances[copies + 1]  # many exact distance ties
    indices = torch.randint(0, MAX_CODEBOOK_SIZE, (n,), generator=generator, dtype=torch.int64)
    keys = pack_keys(distances.float(), indices)
    assert torch.equal(unpack_index(keys), indices)
    order = torch.argsort(keys)
    pairs = list(zip(distances[order].tolist(), indices[order].tolist()))
    assert all(_canonical(*a) < _canonical(*b) for a, b in zip(pairs, pairs[1:]) if a != b)


def test_min_of_tied_keys_across_shards_takes_the_lowest_index():
    distances = torch.tensor([-2.0, 0.0, float("inf"), float("nan")])
    shard_a = pack_keys(distances, torch.tensor([900, 901, 902, 903]))
    shard_b = pack_keys(torch.tensor([-2.0, -0.0, float("inf"), float("inf")]), torch.tensor([3, 4, 5, 6]))
    assert unpack_index(torch.minimum(shard_a, shard_b)).tolist() == [3, 4, 5, 6]


def test_indices_outside_the_key_layout_are_rejected():
    with pytest.raises(ValueError, match="32-bit index field"):
        pack_keys(torch.zeros(2), torch.tensor([0, MAX_CODEBOOK_SIZE]))
    with pytest.raises(ValueError, match="32-bit index field"):
        pack_keys(torch.zeros(1), torch.tensor([-1]))
    with pytest.raises(ValueError, match="codebook_size=4294967297"):
        ShardedCodebook(MAX_CODEBOOK_SIZE + 1, 4, 0, None, 0, 1)
    with pytest.raises(ValueError, match="outside 0..2\\^32"):
        sharded_nearest(torch.zeros(3, 4), torch.zeros(2, 4), MAX_CODEBOOK_SIZE - 1, None)


def test_without_a_group_the_search_is_local_with_the_row_offset():
    codes, z = planted_codes(1, 300, 8), check_tokens(1, 300, 50, 8)
    start, stop = 120, 260
    expected = nearest_code(z, codes[start:stop])[1] + start
    assert torch.equal(sharded_nearest(z, codes[start:stop], start, None), expected)
    local, single = LocalCodebook(300, 8, 2), ShardedCodebook(300, 8, 2, None, 0, 1)
    project = torch.nn.Linear(8, 8)
    assert single.row_range == (0, 300)
    assert not single.state_dict(), "the frozen rows are regenerated, never checkpointed"
    codes = project(local.weight)
    assert torch.equal(single.search(z, codes), local.search(z, codes))
    assert torch.equal(single.lookup(torch.tensor([[0, 299], [7, 7]])), local.lookup(torch.tensor([[0, 299], [7, 7]])))


# ---------------------------------------------------------------- shared case data (parent and children)

INTEGER_COUNTS = [9, 17, 0, 5]
TINY_COUNTS = [6, 2, 0, 6]
TRAIN_K, TRAIN_DIM, TRAIN_SEED, TRAIN_TOKENS, TRAIN_STEPS = 777, 8, 5, 24, 4


def _gaussian_case(world_size: int):
    """K = 1001 (uneven over 3 and 4), rows copied across shards, rank 0 without tokens."""
    counts = check_token_counts(120, world_size)
    return planted_codes(3, 1001, 16), check_tokens(3, 1001, sum(counts), 16), counts


def _integer_case(world_size: int):
    """Small integer entries: every distance is exact, so ties across shards are everywhere."""
    generator = torch.Generator().manual_seed(11)
    counts = INTEGER_COUNTS[:world_size]
    codes = torch.randint(-2, 3, (30, 4), generator=generator).float()
    return codes, torch.randint(-2, 3, (sum(counts), 4), generator=generator).float(), counts


def _tiny_case(world_size: int):
    """K = 3 with rows 0 and 2 equal: some ranks own one row or none."""
    generator = torch.Generator().manual_seed(12)
    counts = TINY_COUNTS[:world_size]
    codes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return codes, torch.randint(-1, 2, (sum(counts), 3), generator=generator).float(), counts


EXACTNESS_CASES = {"gaussian": _gaussian_case, "integer": _integer_case, "tiny": _tiny_case}


def _mine(tokens: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    first = sum(counts[:rank])
    return tokens[first : first + counts[rank]]


def _train_tokens(step: int, n: int) -> torch.Tensor:
    return torch.randn(n, TRAIN_DIM, generator=torch.Generator().manual_seed(100 + step)) * 0.5


def _seeded_simvq(codebook) -> SimVQ:
    quantizer = SimVQ(TRAIN_K, TRAIN_DIM, seed=TRAIN_SEED, codebook=codebook)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        quantizer.proj.weight.copy_(torch.eye(TRAIN_DIM) + 0.3 * torch.randn(TRAIN_DIM, TRAIN_DIM, generator=generator))
        quantizer.proj.bias.copy_(0.1 * torch.randn(TRAIN_DIM, generator=generator))
    return quantizer


def _train(quantizer: SimVQ, tokens_of_step, world_size: int, device) -> dict:
    """A few Adam steps on the commitment loss; gradients averaged over ranks as data parallelism does."""
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.05)
    indices = []
    for step in range(TRAIN_STEPS):
        out = quantizer(tokens_of_step(step).to(device))
        optimizer.zero_grad()
        out.loss.backward()
        if world_size > 1:
            for parameter in quantizer.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size
        optimizer.step()
        indices.append(out.indices.cpu())
    return {"weight": quantizer.proj.weight.detach().cpu(), "bias": quantizer.proj.bias.detach().cpu(),
            "indices": indices}


# ---------------------------------------------------------------- the per-rank program


def _raise_in_search(*args, **kwargs):
    raise RuntimeError("injected failure inside the local search")


def _outcome(call) -> tuple[str, str] | torch.Tensor:
    try:
        return call().cpu()
    except Exception as error:  # noqa: BLE001 - the test inspects which error each rank saw
        return type(error).__name__, str(error)


def _worker(rank: int, world_size: int, device_type: str) -> dict:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = dist.group.WORLD
    out = {}
    for name, make_case in EXACTNESS_CASES.items():
        codes, tokens, counts = make_case(world_size)
        start, stop = shard_range(codes.shape[0], rank, world_size)
        out[name] = sharded_nearest(_mine(tokens, counts, rank).to(device), codes[start:stop].to(device), start,
                                    world).cpu()
    if world_size == 4:  # quantizer.shard.group = 2: two groups, each holding the whole codebook
        group, group_rank, group_size = codebook_shard_group("2")
        codes, tokens, counts = _gaussian_case(world_size)
        start, stop = shard_range(codes.shape[0], group_rank, group_size)
        out["subgroup"] = sharded_nearest(_mine(tokens, counts, rank).to(device), codes[start:stop].to(device),
                                          start, group).cpu()

    codebook = ShardedCodebook(TRAIN_K, TRAIN_DIM, TRAIN_SEED, world, rank, world_size).to(device)
    out["row_range"] = codebook.row_range
    wanted = torch.randint(0, TRAIN_K, (rank * 5, 2), generator=torch.Generator().manual_seed(rank))
    out["lookup"] = (wanted, codebook.lookup(wanted.to(device)).cpu())
    quantizer = _seeded_simvq(codebook).to(device)
    out["train"] = _train(quantizer, lambda step: _mine(_train_tokens(step, world_size * TRAIN_TOKENS),
                                                        [TRAIN_TOKENS] * world_size, rank), world_size, device)

    # Failures: each one must end in an error on every rank, and leave the group usable.
    codes, tokens, counts = _gaussian_case(world_size)
    start, stop = shard_range(codes.shape[0], rank, world_size)
    z, my_codes = _mine(tokens, counts, rank).to(device), codes[start:stop].to(device)
    if rank == world_size - 1:
        sharded.nearest_code = _raise_in_search
    out["fail_search"] = _outcome(lambda: sharded_nearest(z, my_codes, start, world))
    sharded.nearest_code = nearest_code
    bad_z = z[:, :3] if rank == 1 else z
    out["fail_input"] = _outcome(lambda: sharded_nearest(bad_z, my_codes, start, world))
    out["fail_input_codes"] = my_codes.shape
    bad_wanted = torch.tensor([0, TRAIN_K]) if rank == 0 else torch.tensor([1])
    out["fail_lookup"] = _outcome(lambda: codebook.lookup(bad_wanted.to(device)))
    out["after_failures"] = sharded_nearest(z, my_codes, start, world).cpu()

    if world_size == 2 and device.type == "cpu":  # a rank that never arrives: the group's timeout ends the wait
        short = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=2))
        if rank == 1:
            time.sleep(6)
        out["hung_peer"] = _outcome(lambda: sharded_nearest(z, my_codes, start, short))
    return out


@functools.lru_cache(maxsize=None)
def _results(world_size: int) -> list[dict]:
    return run_distributed(_worker, world_size, "cpu", timeout_s=120.0)


# ---------------------------------------------------------------- distributed tests (CPU, gloo)

WORLD_SIZES = [2, 3, 4]


def _check_exactness(results: list[dict], world_size: int) -> None:
    for name, make_case in EXACTNESS_CASES.items():
        codes, tokens, counts = make_case(world_size)
        scores = codes.pow(2).sum(1) - 2 * tokens @ codes.T
        tied = (scores == scores.min(1, keepdim=True).values).sum(1) > 1
        assert tied.any(), f"case {name} plants no ties"
        got = torch.cat([r[name] for r in results])
        assert [r[name].numel() for r in results] == counts
        assert torch.equal(got, nearest_code(tokens, codes)[1]), name
    if world_size == 4:
        codes, tokens, _ = _gaussian_case(world_size)
        assert torch.equal(torch.cat([r["subgroup"] for r in results]), nearest_code(tokens, codes)[1])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_indices_equal_single_process_search(world_size):
    _check_exactness(_results(world_size), world_size)


def test_one_process_check_main_has_no_mismatches():
    report = check_main(1, 1001, 200, 8, seed=4)
    assert report == {"world_size": 1, "codebook_size": 1001, "tokens": 200, "mismatches": 0}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shard_rows_tile_the_codebook_and_lookup_returns_frozen_rows(world_size):
    results = _results(world_size)
    ranges = [r["row_range"] for r in results]
    assert ranges[0][0] == 0 and ranges[-1][1] == TRAIN_K
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    full = gaussian_rows(TRAIN_SEED, TRAIN_K, TRAIN_DIM)
    for wanted, rows in (r["lookup"] for r in results):
        assert rows.shape == (*wanted.shape, TRAIN_DIM)
        assert torch.equal(rows, full[wanted])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_w_after_training_matches_an_unsharded_run(world_size):
    reference = _train(_seeded_simvq(LocalCodebook(TRAIN_K, TRAIN_DIM, TRAIN_SEED)),
                       lambda step: _train_tokens(step, world_size * TRAIN_TOKENS), 1, torch.device("cpu"))
    assert not torch.allclose(reference["weight"], _seeded_simvq(None).proj.weight), "training did not move W"
    for result in _results(world_size):
        train = result["train"]
        torch.testing.assert_close(train["weight"], reference["weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(train["bias"], reference["bias"], rtol=1e-5, atol=1e-6)
    for step in range(TRAIN_STEPS):
        sharded_indices = torch.cat([r["train"]["indices"][step] for r in _results(world_size)])
        assert torch.equal(sharded_indices, reference["indices"][step])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_rank_that_fails_makes_every_rank_raise_and_the_group_survives(world_size):
    results = _results(world_size)  # a hang here would end in run_distributed's TimeoutError, failing the test
    last = world_size - 1
    assert results[last]["fail_search"] == ("RuntimeError", "injected failure inside the local search")
    for r in range(last):
        kind, message = results[r]["fail_search"]
        assert kind == "ShardedSearchError" and f"failed on rank {last} " in message
    rank1_tokens = check_token_counts(120, world_size)[1]
    assert results[1]["fail_input"] == ("ValueError", "sharded_nearest expects z (n, d) and codes (K_local, d), got "
                                        f"({rank1_tokens}, 3) and {tuple(results[1]['fail_input_codes'])}")
    for r in set(range(world_size)) - {1}:
        assert results[r]["fail_input"][0] == "ShardedSearchError" and "rank 1 " in results[r]["fail_input"][1]
    assert results[0]["fail_lookup"][0] == "ValueError" and "777" in results[0]["fail_lookup"][1]
    for r in range(1, world_size):
        assert results[r]["fail_lookup"][0] == "ShardedSearchError" and "rank 0 " in results[r]["fail_lookup"][1]
    codes, tokens, _ = _gaussian_case(world_size)
    assert torch.equal(torch.cat([r["after_failures"] for r in results]), nearest_code(tokens, codes)[1])


@pytest.mark.slow
def test_a_rank_that_never_arrives_ends_in_the_group_timeout():
    # Rank 1 sleeps past the 2 s group timeout before joining: without the timeout rank 0 would
    # simply wait and then succeed; with it rank 0 raises instead of hanging.
    waiting = _results(2)[0]["hung_peer"]
    assert isinstance(waiting, tuple), "rank 0 waited for the late rank instead of timing out"
    assert "timed out" in waiting[1].lower() or "timeout" in waiting[1].lower(), waiting


# ---------------------------------------------------------------- GPU (NCCL)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA devices for NCCL")
@pytest.mark.parametrize("world_size", [2, 4])
def test_nccl_sharded_indices_equal_single_process_search(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {torch.cuda.device_count()}")
    results = run_distributed(_worker, world_size, "cuda", backend="nccl", timeout_s=300.0)
    _check_exactness(results, world_size)
    for r in range(world_size - 1):
        assert results[r]["fail_search"][0] == "ShardedSearchError"
