"""What a config needs before anything is built: its data and pretrained weights exist and can be read,
and its output folder can be written.

launch/train.py runs these checks on every rank (each node checks its own view of the files), for
--dry-run and before a real run, so a run that cannot train stops in seconds with one line that names
the setting, instead of a traceback minutes later. Nothing here creates or writes a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from simvq_scale.config import Config
from simvq_scale.data import ShardPatternError, expand_shards
from simvq_scale.modality import get_modality
from simvq_scale.train.run_dir import RunDirError


def check_data(cfg: Config) -> None:
    """Every shard the config names exists and is readable (ShardPatternError otherwise)."""
    for key, pattern in (("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)):
        if key == "data.val_shards" and not pattern:
            continue  # validation shards are optional
        try:
            shards = expand_shards(pattern)
        except ShardPatternError as e:
            raise ShardPatternError(f"{key}: {e}; point it at your shards with --set {key}=PATTERN") from None
        unreadable = [path for path in shards if not os.access(path, os.R_OK)]
        if unreadable:
            raise ShardPatternError(f"{key}: {len(unreadable)} of {len(shards)} shards cannot be read, first "
                                    f"{unreadable[0]}; fix their permissions")


def check_weights(cfg: Config) -> None:
    """The pretrained networks the losses load are on disk (WeightsNotFoundError, naming the setting)."""
    get_modality(cfg.data.modality).check_pretrained(cfg)


def check_output_folder(cfg: Config) -> None:
    """train.out_dir is writable, or can be created (RunDirError otherwise)."""
    folder = Path(cfg.train.out_dir).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == folder else f"cannot be created: {existing} is not a writable folder"
        raise RunDirError(f"train.out_dir={cfg.train.out_dir} {what}; choose another with --set train.out_dir=PATH")


def check_inputs(cfg: Config) -> None:
    check_data(cfg)
    check_weights(cfg)
    check_output_folder(cfg)
