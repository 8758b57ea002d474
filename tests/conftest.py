"""Shared test set-up: CPU DeepSpeed without its shared-memory op build, and data paths."""

import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real development data not found at {SHARED_DATA}")
    return SHARED_DATA
