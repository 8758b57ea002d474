"""tools/bench_search.py: which search_with_stats settings each --impls entry times."""

import pytest

from simvq_scale.quant import search_triton
from simvq_scale.tools.bench_search import parse_triton_config


def test_triton_rows_use_the_trainers_tiles_for_the_width_and_rescan_sends_every_token_to_the_fallback():
    # at d = 512 search_with_stats' own defaults need more shared memory than a Hopper block has
    assert parse_triton_config("triton", 512) == search_triton.fit_tiles(512) | {"rescan_all": False}
    assert parse_triton_config("triton_rescan", 512) == search_triton.fit_tiles(512) | {"rescan_all": True}
    assert parse_triton_config("triton@64x32x4x2", 512) == {"block_m": 64, "block_k": 32, "num_warps": 4,
                                                            "num_stages": 2}


@pytest.mark.parametrize("name", ["tritonx", "triton@64x32", "triton@axbxcxd"])
def test_a_bad_triton_entry_is_named(name):
    with pytest.raises(SystemExit, match=name):
        parse_triton_config(name, 128)
