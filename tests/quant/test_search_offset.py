"""The exact search is invariant to a common shift: tokens and codes far from the origin (speech tokens
sit on a large shared offset with a small spread) still get the fp64-nearest code, on the torch search,
the fused kernel (TRITON_INTERPRET=1 on the CPU) and the sharded search (gloo), with ties on the
lowest index and decode_indices equal to forward's z_q bit for bit.

Without the centred frame, ||c||^2 - 2 z.c cancels: at offset 300 the fp32 search picked a farther
code for most tokens (issue 12); each test also shows that its check catches that search.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from simvq_scale.quant import search_triton
from simvq_scale.quant.base import straight_through
from simvq_scale.quant.codebook import gaussian_rows, shard_range
from simvq_scale.quant.lc import LC
from simvq_scale.quant.search import nearest_code_torch
from simvq_scale.quant.sharded import ShardedCodebook
from simvq_scale.quant.simvq import SimVQ
from simvq_scale.quant.vq import VQ
from simvq_scale.tools.search_check import fp64_excess
from tests.dist_utils import run_distributed
from tests.helpers import ROOT

OFFSETS = [30.0, 300.0, 3000.0]
K, DIM, TOKENS, SEED = 1000, 16, 96, 5
DUPLICATED, COPIES = 3, (700, 999)  # row 3 of C is copied to rows 700 and 999: exact ties across shards
PLANTED = range(0, TOKENS, 8)  # tokens placed next to the duplicated code


def offset_simvq(offset: float, search_impl: str = "torch", codebook=None) -> SimVQ:
    """SimVQ whose codes C W^T + b sit around `offset` (b = offset + noise), with duplicated rows of C."""
    torch.manual_seed(0)
    quantizer = SimVQ(K, DIM, seed=SEED, search_impl=search_impl, codebook=codebook)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        quantizer.proj.weight.copy_(torch.eye(DIM) + 0.3 * torch.randn(DIM, DIM, generator=generator))
        quantizer.proj.bias.copy_(offset + 0.1 * torch.randn(DIM, generator=generator))
        rows = quantizer.codebook.weight
        start = getattr(quantizer.codebook, "row_range", (0, K))[0]
        source = gaussian_rows(SEED, K, DIM, DUPLICATED, DUPLICATED + 1)[0]
        for copy in COPIES:
            if 0 <= copy - start < rows.shape[0]:
                rows[copy - start] = source
    return quantizer


def offset_tokens(quantizer: SimVQ) -> torch.Tensor:
    """Tokens spread like the codes around b; every eighth one next to the duplicated code."""
    generator = torch.Generator().manual_seed(2)
    bias = quantizer.proj.bias.detach()
    z = bias + 0.4 * torch.randn(TOKENS, DIM, generator=generator)
    duplicated = quantizer.project(gaussian_rows(SEED, K, DIM, DUPLICATED, DUPLICATED + 1)).detach()[0]
    for t in PLANTED:
        z[t] = duplicated + 1e-3 * torch.randn(DIM, generator=generator)
    return z


def simvq_reference(quantizer: SimVQ, full_rows: torch.Tensor):
    """(the codes in exact arithmetic as the search sees them: C W^T (fp32) + b, in fp64; the origin b)."""
    with torch.no_grad():
        bias_free = quantizer.project(full_rows, bias=False)
        bias = quantizer.proj.bias.detach()
    return bias_free.double() + bias.double(), bias


def full_rows_with_copies() -> torch.Tensor:
    rows = gaussian_rows(SEED, K, DIM)
    rows[list(COPIES)] = rows[DUPLICATED].clone()
    return rows


def simvq_case(offset: float, search_impl: str) -> dict:
    quantizer = offset_simvq(offset, search_impl)
    z = offset_tokens(quantizer)
    out = quantizer(z)
    codes64, origin = simvq_reference(quantizer, quantizer.codebook.weight)
    excess, tolerance = fp64_excess(z, codes64, out.indices, origin=origin)
    # the former search: z against the materialised codes C W^T + b, offset and all
    uncentred = nearest_code_torch(z, quantizer.project(quantizer.codebook.weight).detach())[1]
    excess_uncentred, _ = fp64_excess(z, codes64, uncentred, origin=origin)
    return {
        "wrong": int((excess > tolerance).sum()),
        "uncentred_wrong": int((excess_uncentred > tolerance).sum()),
        "planted": [int(out.indices[t]) for t in PLANTED],
        "decode_equal": bool(torch.equal(straight_through(z, quantizer.decode_indices(out.indices)), out.z_q)),
    }


def vq_case(offset: float, search_impl: str) -> dict:
    """VQ with its codes around `offset` (its search centres on the codes' mean), one duplicated code."""
    torch.manual_seed(0)
    quantizer = VQ(K, DIM, search_impl=search_impl)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        centre = offset + 0.1 * torch.randn(DIM, generator=generator)
        weight = quantizer.embedding.weight
        weight.copy_(centre + 0.3 * torch.randn(K, DIM, generator=generator))
        weight[list(COPIES)] = weight[DUPLICATED].clone()
    z = centre + 0.3 * torch.randn(TOKENS, DIM, generator=generator)
    for t in PLANTED:
        z[t] = weight[DUPLICATED] + 1e-3 * torch.randn(DIM, generator=generator)
    out = quantizer(z)
    codes = weight.detach()
    excess, tolerance = fp64_excess(z, codes, out.indices, origin=codes.double().mean(0))
    uncentred = nearest_code_torch(z, codes)[1]
    excess_uncentred, _ = fp64_excess(z, codes, uncentred, origin=codes.double().mean(0))
    return {"wrong": int((excess > tolerance).sum()), "uncentred_wrong": int((excess_uncentred > tolerance).sum()),
            "planted": [int(out.indices[t]) for t in PLANTED],
            "decode_equal": bool(torch.equal(straight_through(z, quantizer.decode_indices(out.indices)), out.z_q))}


def check_cases(search_impl: str) -> list[dict]:
    return ([{"kind": "simvq", "offset": o} | simvq_case(o, search_impl) for o in OFFSETS]
            + [{"kind": "vq", "offset": o} | vq_case(o, search_impl) for o in OFFSETS])


def assert_exact(result: dict) -> None:
    assert result["wrong"] == 0, result
    assert result["planted"] == [DUPLICATED] * len(PLANTED), result  # the lowest of three equal codes
    assert result["decode_equal"], result
    if result["offset"] >= 300:  # the check can fail: it catches the uncentred search
        assert result["uncentred_wrong"] > 0, result


@pytest.mark.parametrize("kind", ["simvq", "vq"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_torch_search_is_exact_at_large_offsets(kind, offset):
    case = simvq_case if kind == "simvq" else vq_case
    assert_exact({"kind": kind, "offset": offset} | case(offset, "torch"))


def test_lc_search_is_centred_on_its_projected_feature_mean(tmp_path):
    # VQGAN-LC's frozen features are not zero-mean: here they sit on an offset of 300 themselves
    import numpy as np

    generator = torch.Generator().manual_seed(4)
    features = 300.0 + torch.randn(K, 12, generator=generator)
    features[list(COPIES)] = features[DUPLICATED].clone()
    np.save(tmp_path / "features.npy", features.numpy())
    torch.manual_seed(0)
    quantizer = LC(K, DIM, tmp_path / "features.npy", search_impl="torch")
    codes, origin = quantizer.search_frame()
    codes64 = codes.double() + origin.double()
    z = origin + 0.05 * torch.randn(TOKENS, DIM, generator=generator) * codes.std()
    for t in PLANTED:
        z[t] = quantizer.decode_indices(torch.tensor(DUPLICATED)).detach() + 1e-4 * torch.randn(DIM, generator=generator)
    out = quantizer(z)
    excess, tolerance = fp64_excess(z, codes64, out.indices, origin=origin)
    assert int((excess > tolerance).sum()) == 0
    assert [int(out.indices[t]) for t in PLANTED] == [DUPLICATED] * len(PLANTED)
    uncentred = nearest_code_torch(z, quantizer.project(quantizer.codebook.weight).detach())[1]
    assert int((fp64_excess(z, codes64, uncentred, origin=origin)[0] > tolerance).sum()) > 0
    assert torch.equal(straight_through(z, quantizer.decode_indices(out.indices)), out.z_q)


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    """The same cases through the fused kernel, in one TRITON_INTERPRET=1 subprocess."""
    if search_triton.triton is None:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__, "--interpret-cases"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["simvq", "vq"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_fused_search_is_exact_at_large_offsets(interpreted, kind, offset):
    (result,) = [r for r in interpreted if (r["kind"], r["offset"]) == (kind, offset)]
    assert_exact(result)


def _sharded_offsets(rank: int, world_size: int) -> dict:
    out = {}
    for offset in OFFSETS:
        codebook = ShardedCodebook(K, DIM, SEED, torch.distributed.group.WORLD, rank, world_size)
        quantizer = offset_simvq(offset, codebook=codebook)
        z = offset_tokens(quantizer)
        counts = [TOKENS // world_size + (r < TOKENS % world_size) for r in range(world_size)]
        first = sum(counts[:rank])
        mine = z[first : first + counts[rank]]
        result = quantizer(mine)
        decoded = quantizer.decode_indices(result.indices)  # collective too: every rank calls it
        out[offset] = {"indices": result.indices, "row_range": codebook.row_range,
                       "decode_equal": torch.equal(straight_through(mine, decoded), result.z_q)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_search_is_exact_at_large_offsets(world_size):
    results = run_distributed(_sharded_offsets, world_size, timeout_s=180.0)
    assert all(stop - start < K for start, stop in (r[OFFSETS[0]]["row_range"] for r in results))  # really split
    for offset in OFFSETS:
        local = offset_simvq(offset)
        z = offset_tokens(local)
        indices = torch.cat([r[offset]["indices"] for r in results])
        codes64, origin = simvq_reference(local, full_rows_with_copies())
        excess, tolerance = fp64_excess(z, codes64, indices, origin=origin)
        assert int((excess > tolerance).sum()) == 0, offset
        assert [int(indices[t]) for t in PLANTED] == [DUPLICATED] * len(PLANTED), offset
        assert torch.equal(indices, local(z).indices), offset  # the same frame as one process: same answer
        assert all(r[offset]["decode_equal"] for r in results), offset


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-cases"]:
    for result in check_cases("triton"):
        print(json.dumps(result), flush=True)
