"""Loading .pt files that may come from someone else: torch's weights-only unpickler, never the full one.

A .pt file is a pickle, and `torch.load(weights_only=False)` calls whatever functions the pickle
names, so a crafted export, rank file or checkpoint runs its author's code on the machine that
loads it. Everything simvq-scale reads back (the generator export, each rank's state, DeepSpeed's
checkpoint files) holds only tensors, numbers, strings and plain containers, plus three inert
DeepSpeed classes in ZeRO optimizer files; those are loaded here through the allowlist of
`torch.load(weights_only=True)`, and a file that names anything else is refused, not run.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class FileLoadError(ValueError):
    """A .pt file that cannot be loaded: refused as unsafe, truncated or not a torch file."""


class UnsafeFileError(FileLoadError):
    """A .pt file that names Python objects beyond tensors and plain containers."""


def load(path: str | Path, map_location: Any = "cpu", allow: tuple[type, ...] = ()) -> Any:
    """torch.load(path) with the weights-only unpickler; `allow`: further classes known to be inert."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\n|$)", str(e))
        what = found.group(1).strip() if found and found.group(1).strip() else "an object outside the allowlist"
        raise UnsafeFileError(
            f"{path}: refused to load ({what}): the file holds Python objects beyond tensors and plain "
            f"containers, which loading would execute. simvq-scale never writes such files; it is corrupt or "
            f"crafted. Use a copy you trust.") from None
    except (RuntimeError, EOFError) as e:  # torch reports a truncated or foreign file as RuntimeError
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileLoadError(f"{path}: not a readable torch file ({first_line}); it is truncated or corrupt, "
                            f"use an intact copy") from None
