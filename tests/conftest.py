"""Shared test set-up: CPU DeepSpeed without its shared-memory op build, and the data fixtures."""

from pathlib import Path

import pytest
import torch

from simvq_scale.distributed import prepare_cpu_deepspeed
from tests.helpers import ROOT, SHARED_DATA, tiny_export

if not torch.cuda.is_available():  # CPU machines: DeepSpeed on gloo, without its shm-op build
    prepare_cpu_deepspeed()


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
    tool = ROOT / "tools" / "make_demo_data.py"
    subprocess.run([sys.executable, str(tool), "--out", str(out)], check=True, capture_output=True)
    return json.loads((out / "demo.json").read_text()) | {"dir": str(out)}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Run dirs of tiny untrained image and audio exports (helpers.tiny_export)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    return {m: tiny_export(m, root / m) for m in ("image", "audio")}
