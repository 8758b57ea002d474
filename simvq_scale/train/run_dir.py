"""The run folder (train.out_dir): one run at a time, nothing overwritten unasked, a resume that fits
its checkpoint, no leftovers of a killed run.

RunDir.open is collective: rank 0 decides, and every rank returns the same answer or raises the same
RunDirError, before the run writes anything but its lock:
  1. it creates the folder and takes its lock, run.lock: an flock held for the life of the process, so a
     second run into the folder is refused and a killed run leaves no stale lock (flock works on local
     file systems and NFSv4; on a shared file system without locks the lock protects one node only);
  2. it resolves --resume (resolve_resume) and compares the config with the checkpoint's: a difference
     in the networks' tensor shapes, the codebook seed or the ZeRO stages is one error naming the
     settings; other differences (steps, lr, the world size, ...) are allowed and listed in one line;
  3. a fresh start (no --resume, --resume auto without a checkpoint, or --resume from another folder)
     into a folder that holds a checkpoint, an export or an earlier run's logs is refused, unless
     --overwrite, which deletes what a run writes there (RUN_OUTPUTS) and nothing else; --resume auto
     also clears the logs of an earlier run that left no checkpoint;
  4. a resume in its own folder tidies it: temporary files of a killed run go (generator_ema.tmp,
     ckpt/latest.tmp, ckpt/universal/), checkpoints newer than the resumed one go (unfinished ones always,
     finished ones only with --overwrite), and metrics.jsonl keeps the rows up to the resumed step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch.distributed as dist
from torch import nn

from simvq_scale import distributed
from simvq_scale.config import Config, dotted_items, to_dict
from simvq_scale.inference import EXPORT_NAME, partial_export
from simvq_scale.train.checkpoint import (CHECKPOINT_DIR, ENGINES, MODEL_STATES, TAG_PREFIX, TRAINER_STATE,
                                          Checkpointer, read_trainer_state, step_of, tag_for, tensor_shapes)
from simvq_scale.train.logging import METRICS_FILE, TENSORBOARD_DIR

LOCK_NAME = "run.lock"
CONFIG_FILE = "config.yaml"  # the resolved config the trainer writes in train.out_dir
# what --overwrite deletes
RUN_OUTPUTS = (CHECKPOINT_DIR, TENSORBOARD_DIR, METRICS_FILE, EXPORT_NAME, partial_export(Path(EXPORT_NAME)).name,
               CONFIG_FILE)
# Settings a resume must keep: the codebook is regenerated from its seed, not stored; a ZeRO stage
# decides the checkpoint's layout. Settings under these prefixes build the networks, so they are named
# when the tensor shapes differ.
FIXED_SETTINGS = ("quantizer.seed", "optim.zero_stage_g", "optim.zero_stage_d")
NETWORK_PREFIXES = ("quantizer.", "model.", "data.modality")


class RunDirError(RuntimeError):
    """A run folder, --resume or --overwrite request that cannot go ahead; the message says what to do."""


def resolve_resume(resume: str | None, own_root: Path) -> tuple[Path, str] | None:
    """(checkpoint root, tag) for `--resume auto|PATH`, or None to start fresh.

    PATH may be a run folder, its ckpt/ folder, ckpt/generator (or discriminator), or ckpt/<engine>/<tag>."""
    if not resume:
        return None
    if resume == "auto":
        latest = own_root / "latest"
        return _complete(own_root, latest.read_text().strip(), "--resume auto") if latest.is_file() else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise RunDirError(f"--resume {resume}: no such folder; pass a run folder, its ckpt/ folder or "
                          f"ckpt/generator/<tag>")
    if (path / CHECKPOINT_DIR / "latest").is_file():
        path = path / CHECKPOINT_DIR
    if path.name in ENGINES and (path.parent / "latest").is_file():
        path = path.parent
    if (path / "latest").is_file() and all((path / engine).is_dir() for engine in ENGINES):
        return _complete(path, (path / "latest").read_text().strip(), f"--resume {resume}")
    if path.parent.name in ENGINES and step_of(path.name) is not None:
        return _complete(path.parent.parent, path.name, f"--resume {resume}")
    raise RunDirError(f"--resume {resume}: no checkpoint there; pass a run folder, its ckpt/ folder (with a "
                      f"'latest' file), ckpt/generator or a tag folder such as ckpt/generator/{tag_for(1000)}")


def _complete(root: Path, tag: str, what: str) -> tuple[Path, str]:
    missing = [root / engine / tag for engine in ENGINES if not (root / engine / tag / MODEL_STATES).is_file()]
    if missing:
        found = sorted(p.name for p in (root / "generator").glob(f"{TAG_PREFIX}*")
                       if (p / MODEL_STATES).is_file() and (root / "discriminator" / p.name / MODEL_STATES).is_file())
        alternative = (f"resume an intact one with --resume {root / 'generator' / found[-1]}" if found
                       else "no intact checkpoint is left")
        raise RunDirError(f"{what}: checkpoint {tag} is incomplete ({missing[0]} has no {MODEL_STATES}); "
                          f"{alternative}, or start over with --overwrite")
    return root, tag


def config_changes(saved: dict, now: dict) -> dict[str, tuple[object, object]]:
    """{dotted key: (checkpoint's value, new value)} of every setting that differs ('absent' if missing)."""
    before, after = dotted_items(saved), dotted_items(now)
    return {k: (before.get(k, "absent"), after.get(k, "absent")) for k in sorted(before.keys() | after.keys())
            if before.get(k, "absent") != after.get(k, "absent")}


def _describe(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


def check_resume_config(saved: dict, config: dict, shapes: dict[str, dict[str, list[int]]], where: str) -> str:
    """Raise RunDirError for a config that cannot continue the checkpoint `saved` (read_trainer_state);
    return the line that lists the allowed differences ('' when there are none)."""
    changes = config_changes(saved["config"], config)
    differing = [f"{engine} {name} {saved['shapes'][engine].get(name, 'absent')} -> {shape.get(name, 'absent')}"
                 for engine, shape in shapes.items()
                 for name in sorted(saved["shapes"][engine].keys() | shape.keys())
                 if saved["shapes"][engine].get(name) != shape.get(name)]
    blocking = {k: v for k, v in changes.items() if k in FIXED_SETTINGS
                or (differing and k.startswith(NETWORK_PREFIXES))}
    if blocking or differing:
        named = _describe(blocking) or "no network setting (the code that builds the networks changed)"
        shapes_note = f"; tensor shapes differ ({len(differing)}), e.g. {differing[0]}" if differing else ""
        raise RunDirError(f"cannot resume {where}: the config changes {named}{shapes_note}. Resume with the "
                          f"checkpoint's values (saved in {where}/{TRAINER_STATE}) or start a new run in "
                          f"another train.out_dir")
    return f"resuming with settings that differ from the checkpoint's: {_describe(changes)}" if changes else ""


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of metrics.jsonl up to `step` (a resumed run writes the later ones again); returns
    how many rows were dropped. Written to a temporary file and renamed, so a kill leaves either file."""
    if not path.is_file():
        return 0
    rows = path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)


class RunDir:
    def __init__(self, cfg: Config, checkpointer: Checkpointer):
        self.out = Path(cfg.train.out_dir)
        self.cfg, self.checkpointer = cfg, checkpointer
        self._lock = None

    def open(self, resume: str | None, overwrite: bool, networks: dict[str, nn.Module]) -> tuple[Path, str] | None:
        """Lock, check and prepare the folder (collective); returns the (root, tag) to resume or None."""
        shapes = {name: tensor_shapes(module) for name, module in networks.items()}
        outcome: tuple[str, object] | None = None
        if distributed.is_main():
            try:
                outcome = ("ok", self._decide(resume, overwrite, shapes))
            except OSError as e:  # a file the checks or the tidying could not read, write or delete
                outcome = ("error", RunDirError(f"train.out_dir={self.out}: {e.filename or ''}: {e.strerror}; make "
                                                f"it readable and writable or set another train.out_dir"))
            except Exception as e:  # noqa: BLE001 - every rank must raise it, not wait for rank 0 forever
                outcome = ("error", e)
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0)
        kind, value = shared[0]
        if kind == "error":
            self.close()  # a refused run holds the folder no longer (a retry in this process may take it)
            value.same_on_every_rank = True  # launch/train.py prints it once
            raise value
        self.checkpointer.resume_from = value
        return value

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ rank 0

    def _decide(self, resume: str | None, overwrite: bool, shapes: dict) -> tuple[Path, str] | None:
        self._take_lock()
        found = resolve_resume(resume, self.checkpointer.root)
        own = found is not None and found[0].resolve() == self.checkpointer.root.resolve()
        if own and resume == "auto" and overwrite:
            raise RunDirError(f"--overwrite would delete the run in {self.out} that --resume auto continues; "
                              f"give one of them")
        saved = None
        if found is not None:
            saved = read_trainer_state(*found)
            note = check_resume_config(saved, to_dict(self.cfg), shapes, str(found[0] / "generator" / found[1]))
            if note:
                print(note, flush=True)
        if own:
            self._tidy_for_resume(saved["step"], overwrite)
        else:
            self._prepare_fresh_start(overwrite, resume == "auto")
        return found

    def _take_lock(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            handle = open(self.out / LOCK_NAME, "a+")
        except OSError as e:
            raise RunDirError(f"train.out_dir={self.out}: cannot create or write there ({e.strerror}); choose "
                              f"a writable folder with --set train.out_dir=PATH") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"train.out_dir={self.out} is in use by another run ({holder}; lock file "
                              f"{self.out / LOCK_NAME}); wait for it to end or set another train.out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle

    def _prepare_fresh_start(self, overwrite: bool, auto: bool) -> None:
        present = [name for name in RUN_OUTPUTS if (self.out / name).exists()]
        latest = self.checkpointer.root / "latest"
        holds = ([f"checkpoint {latest.read_text().strip()}"] if latest.is_file() else []) + \
                ([EXPORT_NAME] if (self.out / EXPORT_NAME).exists() else [])
        logs = [name for name in (METRICS_FILE, TENSORBOARD_DIR) if name in present]
        if holds and not overwrite:
            advice = "continue it with --resume auto, " if latest.is_file() else ""
            raise RunDirError(f"train.out_dir={self.out} holds a run ({', '.join(holds)}): {advice}start over with "
                              f"--overwrite (deletes {', '.join(present)}), or set another train.out_dir")
        if logs and not (overwrite or auto):
            raise RunDirError(f"train.out_dir={self.out} holds the logs of an earlier run that left no checkpoint "
                              f"({', '.join(logs)}): start over with --overwrite or --resume auto (either deletes "
                              f"them), or set another train.out_dir")
        for name in present:
            _remove(self.out / name)
        if present:
            print(f"fresh start: removed {', '.join(present)} from {self.out}", flush=True)

    def _tidy_for_resume(self, step: int, overwrite: bool) -> None:
        root = self.checkpointer.root
        latest = root / "latest"
        latest_step = step_of(latest.read_text().strip()) if latest.is_file() else -1
        later = sorted({p.name for engine in ENGINES if (root / engine).is_dir() for p in (root / engine).iterdir()
                        if p.is_dir() and (s := step_of(p.name)) is not None and s > step})
        finished = [tag for tag in later if step_of(tag) <= latest_step]
        if finished and not overwrite:
            raise RunDirError(f"resuming step {step} in {self.out} would replace its later checkpoints "
                              f"{', '.join(finished)}: add --overwrite to discard them, or continue the latest "
                              f"with --resume auto")
        removed = [p for p in (partial_export(self.out / EXPORT_NAME), root / "latest.tmp", root / "universal")
                   if p.exists()]
        removed += [root / engine / tag for tag in later for engine in ENGINES if (root / engine / tag).exists()]
        for path in removed:
            _remove(path)
        if finished:  # `latest` named one of them: point it at the resumed checkpoint
            (root / "latest.tmp").write_text(tag_for(step))
            os.replace(root / "latest.tmp", root / "latest")
        dropped = truncate_metrics(self.out / METRICS_FILE, step)
        if removed or dropped:
            gone = [str(p.relative_to(self.out)) for p in removed] + ([f"{dropped} row(s) of {METRICS_FILE} after "
                                                                       f"step {step}"] if dropped else [])
            print(f"resume: removed {', '.join(gone)}", flush=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
