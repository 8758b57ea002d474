"""Shared test set-up: CPU DeepSpeed without its shared-memory op build, and data paths."""

from pathlib import Path

import pytest
import torch

from simvq_scale.distributed import prepare_cpu_deepspeed

if not torch.cuda.is_available():  # CPU machines: DeepSpeed on gloo, without its shm-op build
    prepare_cpu_deepspeed()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real development data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The README demo's shard sets, built once per test session (~10 s, offline)."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo_data")
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_demo_data.py"
    subprocess.run([sys.executable, str(tool), "--out", str(out)], check=True, capture_output=True)
    return json.loads((out / "demo.json").read_text()) | {"dir": str(out)}
