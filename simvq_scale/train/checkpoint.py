"""Collective checkpoints of the two DeepSpeed engines under one tag, and resume.

Layout under train.out_dir/ckpt:
    generator/<tag>/...        DeepSpeed files of the generator engine (+ client state: trainer state, EMA)
    discriminator/<tag>/...    DeepSpeed files of the discriminator engine
    generator/<tag>/rank_<r>.pt  what differs per rank (its usage-count window)
    latest                     the last tag whose save finished on every rank

`latest` is written last, after a barrier, by rename: a crash mid-save leaves the
previous checkpoint as the one `--resume auto` picks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from simvq_scale import distributed as D

TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep_last: int):
        self.root = Path(out_dir) / "ckpt"
        self.keep_last = keep_last

    def save(self, step: int, engine_g, engine_d, client_state: dict, rank_state: dict) -> str:
        """Every rank calls this; returns the tag."""
        tag = tag_for(step)
        engine_g.save_checkpoint(str(self.root / "generator"), tag=tag, client_state=client_state)
        engine_d.save_checkpoint(str(self.root / "discriminator"), tag=tag)
        rank_file = self.root / "generator" / tag / f"rank_{D.rank()}.pt"
        torch.save(rank_state, rank_file)
        dist.barrier()
        if D.is_main():
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self._prune()
        dist.barrier()
        return tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in (self.root / "generator").glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            for engine in ("generator", "discriminator"):
                shutil.rmtree(self.root / engine / old, ignore_errors=True)

    def resolve(self, resume: str | None) -> tuple[Path, str] | None:
        """(checkpoint root, tag) for `--resume auto|PATH`, or None to start fresh.

        PATH may be a run folder, its ckpt/ folder, or ckpt/generator/<tag>.
        """
        if not resume:
            return None
        if resume == "auto":
            latest = self.root / "latest"
            return (self.root, latest.read_text().strip()) if latest.exists() else None
        path = Path(resume)
        if (path / "ckpt" / "latest").exists():
            path = path / "ckpt"
        if (path / "latest").exists():
            return path, (path / "latest").read_text().strip()
        if path.parent.name == "generator" and path.is_dir():
            return path.parent.parent, path.name
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a run folder, its ckpt/ "
                                f"folder with a 'latest' file, or ckpt/generator/<tag>)")

    @staticmethod
    def load(root: Path, tag: str, engine_g, engine_d) -> tuple[dict, dict | None]:
        """Load both engines (weights, optimizer, LR schedule); returns (client state, this rank's state or None)."""
        path, client_state = engine_g.load_checkpoint(str(root / "generator"), tag=tag)
        if path is None:
            raise FileNotFoundError(f"generator checkpoint {root / 'generator' / tag} could not be loaded")
        path, _ = engine_d.load_checkpoint(str(root / "discriminator"), tag=tag)
        if path is None:
            raise FileNotFoundError(f"discriminator checkpoint {root / 'discriminator' / tag} could not be loaded")
        rank_file = root / "generator" / tag / f"rank_{D.rank()}.pt"
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
        return client_state, rank_state
