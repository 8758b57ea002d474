"""Running launch/train.py as a user does (a subprocess, plain python), reading its one-line errors, and
crafting the .pt files that the refusal tests plant.

    done = train(out_dir, *overrides, extra=["--resume", "auto"])
    message = one_error(done, 5)          # the one `error:` line, after checking the exit code
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "image_demo.yaml")]


def clean_env() -> dict[str, str]:
    """This environment without a launcher's rank variables: launch/train.py then runs as one process."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}


def train(out: Path, *overrides: str, extra: tuple | list = ()) -> subprocess.CompletedProcess:
    cmd = TRAIN + ["--set", *overrides, f"train.out_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)


def one_error(done: subprocess.CompletedProcess, code: int) -> str:
    """The run's single `error:` line, after checking its exit code and that it printed no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


class CreatesMarker:
    """Unpickled by the full unpickler, this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Add the payload to one of our own .pt files (trusted here: the test wrote it)."""
    content = torch.load(path, map_location="cpu", weights_only=False)
    content["payload"] = CreatesMarker(marker)
    torch.save(content, path)
