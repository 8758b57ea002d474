"""Collective checkpoints of the two DeepSpeed engines under one tag, and resume, also at another world size.

Layout under train.out_dir/ckpt:
    generator/<tag>/...                 DeepSpeed files of the generator engine (+ client state: trainer state, EMA)
    discriminator/<tag>/...             DeepSpeed files of the discriminator engine
    generator/<tag>/rank_<r>.pt         what differs per rank (its usage-count window)
    generator/<tag>/trainer_state.json  step, world size, ZeRO stages, config and tensor shapes: what a
                                        resume checks before anything is built or written (run_dir.py)
    latest                              the last tag whose save finished on every rank
    universal/<engine>/<tag>/           only while a resume at another world size loads (see below)

`latest` is written last, after a barrier, by rename: a crash mid-save leaves the previous checkpoint
as the one `--resume auto` picks. Clean-up keeps the `keep_last` highest steps and never the tag that
`latest` names.

Nothing is unpickled with the full unpickler: rank files and DeepSpeed's own files are read through
torch's weights-only unpickler (simvq_scale.weights_only; for DeepSpeed by putting a weights-only
loader in the engine's checkpoint engine, through which it reads every model and ZeRO file). A resume
at another world size goes through DeepSpeed's universal checkpoint: rank 0 converts the tag with
deepspeed.checkpoint.ds_to_universal after checking every file of it with the weights-only unpickler
(the converter itself unpickles fully), the engines load it with "load_universal", and the converted
copy is removed. Each rank's usage window is re-split onto the new ranks (merged or cut, counts kept).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from simvq_scale import distributed
from simvq_scale import weights_only
from simvq_scale.quant.stats import merge_usage_states, split_usage_state

CHECKPOINT_DIR = "ckpt"  # in train.out_dir: both engines' checkpoints, one folder each
TAG_PREFIX = "step"
ENGINES = ("generator", "discriminator")
TRAINER_STATE = "trainer_state.json"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's per-engine file (module weights + client state)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def step_of(tag: str) -> int | None:
    """The step of a tag this module wrote, None for any other name."""
    match = re.fullmatch(rf"{TAG_PREFIX}(\d{{9}})", tag)
    return int(match.group(1)) if match else None


def deepspeed_safe_classes() -> tuple[type, ...]:
    """The DeepSpeed classes inside ZeRO optimizer files; all are inert records (no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def load_deepspeed_file(path: str | Path, map_location="cpu"):
    return weights_only.load(path, map_location, allow=deepspeed_safe_classes())


class _WeightsOnlyCheckpointEngine:
    """An engine's checkpoint engine with load() through the weights-only unpickler; the rest delegated.

    DeepSpeed 0.19.8 reads the model-states and ZeRO files through engine.checkpoint_engine.load, which
    calls torch.load(weights_only=False). Its universal-checkpoint path reads zero/*/*.pt with torch.load
    directly, which is why a conversion checks its source first (Checkpointer._to_universal)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return load_deepspeed_file(path, map_location)


@contextlib.contextmanager
def _weights_only_loading(engine):
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    try:
        yield
    finally:
        engine.checkpoint_engine = engine.checkpoint_engine.inner


def tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def read_trainer_state(root: Path, tag: str) -> dict:
    """step, world_size, zero_stage {engine: stage}, config and shapes {engine: {name: shape}} of a tag.

    Tags saved before trainer_state.json existed give the same from DeepSpeed's model-states files."""
    file = root / "generator" / tag / TRAINER_STATE
    if file.is_file():
        return json.loads(file.read_text())
    state: dict = {"zero_stage": {}, "shapes": {}}
    for engine in ENGINES:
        saved = load_deepspeed_file(root / engine / tag / MODEL_STATES)
        state["zero_stage"][engine] = int(saved["ds_config"]["zero_optimization"]["stage"])
        state["shapes"][engine] = {name: list(t.shape) for name, t in saved["module"].items()}
        if engine == "generator":
            state.update(step=saved["step"], world_size=saved["world_size"], config=saved["config"])
    return state


def usage_sources(old_world: int, new_world: int, rank: int) -> tuple[list[int], int, int]:
    """(old ranks whose usage windows rank `rank` takes, part, parts): on fewer ranks each new rank merges
    the old ranks r with r * new // old == rank; on more ranks the new ranks that map to one old rank
    (j * old // new) share its window in equal parts."""
    if new_world <= old_world:
        return [r for r in range(old_world) if r * new_world // old_world == rank], 0, 1
    source = rank * old_world // new_world
    sharers = [j for j in range(new_world) if j * old_world // new_world == source]
    return [source], sharers.index(rank), len(sharers)


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep_last: int):
        self.root = Path(out_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.resume_from: tuple[Path, str] | None = None  # set by RunDir.open before the engines are built

    def save(self, step: int, engine_g, engine_d, client_state: dict, rank_state: dict) -> str:
        """Every rank calls this; returns the tag."""
        tag = tag_for(step)
        engine_g.save_checkpoint(str(self.root / "generator"), tag=tag, client_state=client_state)
        engine_d.save_checkpoint(str(self.root / "discriminator"), tag=tag)
        rank_file = self.root / "generator" / tag / f"rank_{distributed.rank()}.pt"
        torch.save(rank_state, rank_file)
        if distributed.is_main():
            engines = {"generator": engine_g, "discriminator": engine_d}
            state = {"step": step, "world_size": distributed.world_size(), "config": client_state["config"],
                     "zero_stage": {name: int(e.zero_optimization_stage()) for name, e in engines.items()},
                     "shapes": {name: tensor_shapes(e.module) for name, e in engines.items()}}
            (self.root / "generator" / tag / TRAINER_STATE).write_text(json.dumps(state))
        dist.barrier()
        if distributed.is_main():
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self._prune()
        dist.barrier()
        return tag

    def _prune(self) -> None:
        """Keep the `keep_last` highest steps, by number, and always the tag `latest` names."""
        latest = (self.root / "latest").read_text().strip()
        steps = sorted((s, p.name) for p in (self.root / "generator").iterdir()
                       if p.is_dir() and (s := step_of(p.name)) is not None)
        for _, old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != latest:
                for engine in ENGINES:
                    shutil.rmtree(self.root / engine / old, ignore_errors=True)

    def _universal(self, zero_stage: int) -> bool:
        """Whether the resume needs DeepSpeed's universal checkpoint for an engine of this ZeRO stage:
        its ZeRO partitions were cut for another world size (a stage-0 optimizer state is whole)."""
        if self.resume_from is None or zero_stage == 0:
            return False
        return read_trainer_state(*self.resume_from)["world_size"] != distributed.world_size()

    def deepspeed_config(self, zero_stage: int) -> dict:
        """What an engine's DeepSpeed config needs for the coming load (set before deepspeed.initialize)."""
        return {"checkpoint": {"load_universal": True}} if self._universal(zero_stage) else {}

    def load(self, root: Path, tag: str, engine_g, engine_d) -> tuple[dict, dict | None]:
        """Load both engines (weights, optimizer, LR schedule); returns (client state, this rank's usage state).

        Collective. At another world size than the checkpoint's, through the universal checkpoint."""
        saved = read_trainer_state(root, tag)
        client_state, converted = None, False
        for name, engine in (("generator", engine_g), ("discriminator", engine_d)):
            load_root = root
            if engine.load_universal_checkpoint():
                load_root, converted = self._to_universal(root, tag, name, saved["world_size"]), True
            with _weights_only_loading(engine):
                path, client = engine.load_checkpoint(str(load_root / name), tag=tag)
            if path is None:
                raise FileNotFoundError(f"{name} checkpoint {load_root / name / tag} could not be loaded")
            client_state = client if name == "generator" else client_state
        if converted:
            dist.barrier()  # every rank has read the converted copy
            if distributed.is_main():
                shutil.rmtree(self.root / "universal", ignore_errors=True)
        return client_state, self._rank_state(root, tag, saved["world_size"])

    def _to_universal(self, root: Path, tag: str, engine: str, old_world: int) -> Path:
        """Rank 0 converts <root>/<engine>/<tag> into ckpt/universal (DeepSpeed's ds_to_universal); collective."""
        universal = self.root / "universal"
        if distributed.is_main():
            source = root / engine / tag
            for file in sorted(source.glob("*.pt")):  # the converter unpickles fully: refuse crafted files first
                load_deepspeed_file(file)
            target = universal / engine / tag
            shutil.rmtree(target, ignore_errors=True)
            print(f"converting {source} (world size {old_world}) for world size {distributed.world_size()} "
                  f"into {target} (DeepSpeed universal checkpoint)", flush=True)
            convert_to_universal(source, target)
        dist.barrier()
        return universal

    @staticmethod
    def _rank_state(root: Path, tag: str, old_world: int) -> dict | None:
        """This rank's state (usage window, loader position); at another world size the usage windows of
        the old ranks re-split onto the new ones."""
        sources, part, parts = usage_sources(old_world, distributed.world_size(), distributed.rank())
        files = [root / "generator" / tag / f"rank_{r}.pt" for r in sources]
        if not all(f.is_file() for f in files):
            return None
        if old_world == distributed.world_size():
            return weights_only.load(files[0])  # this rank's own file: usage window and loader position
        # another world size: the usage windows re-split; loader positions do not carry over (the new
        # ranks read other slots of the shards), so the data stream starts its next pass
        states = [weights_only.load(f)["usage"] for f in files]
        usage = merge_usage_states(states) if len(states) > 1 else states[0]
        return {"usage": split_usage_state(usage, part, parts) if parts > 1 else usage}


def convert_to_universal(source: Path, target: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal on one tag folder, in this process; its progress output is
    kept back and shown only if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    args = types.SimpleNamespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)  # our client state has no universal_checkpoint_info
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except BaseException:
        sys.stderr.write(chatter.getvalue()[-5000:])
        raise
