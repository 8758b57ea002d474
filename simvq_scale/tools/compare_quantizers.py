"""Rerun the paper's Table 1 with this trainer on any data: several quantizers (or `--set` variants) with one
config, on the same shards for the same steps; each EMA export evaluated on held-out shards; a Markdown
table, a CSV and plots. Installed as `simvq-compare-quantizers`.

    python tools/compare_quantizers.py --config configs/image_demo.yaml --out runs/table1_demo \
        --skip lpips_vgg,lpips_alex,rfid                   # offline: no metric weights (reported unavailable)
    python tools/compare_quantizers.py --config configs/image_65k.yaml --out runs/table1 --steps 2000 \
        --gpus 0,1,2,3,4,5,6,7 --set 'data.train_shards=/data/imagenet-train-{000000..001281}.tar'
    python tools/compare_quantizers.py --config configs/image_65k.yaml --out runs/fig4 --kinds simvq \
        --variant k65k:quantizer.codebook_size=65536 --variant k262k:quantizer.codebook_size=262144
    python tools/compare_quantizers.py --config configs/audio_4k.yaml --out runs/table2 --kinds vq,fsq,simvq --dry-run

Runs: --kinds (default: the paper's Table 1 set, vq, vq_ema, fc, fsq, lfq, lc, simvq) at one codebook size
(--codebook-size, else the config's), and/or named variants `--variant NAME:KEY=VALUE [KEY=VALUE ...]`; given
both, every kind runs every variant (named KIND-NAME). Each kind gets what it needs at its size: FSQ levels
whose product is K (unless a --set gives them), LFQ only at a power of two (otherwise skipped, the reason in
the table), LC the features of --lc-features (or the config's) or else k-means centres of the training
data's token-sized pieces made offline by simvq-make-lc-features (OUT/lc_features/). Options of one kind
(e.g. quantizer.simvq.init_from_data) are inert for the others.

Each run is `python -m simvq_scale.tools.train --config CONFIG --set ... train.out_dir=OUT/NAME --resume auto`
(simvq-train), its console teed to OUT/NAME/train.log, then `python -m simvq_scale.tools.eval_recon`
(simvq-eval) on its generator_ema.pt over --val-shards (default: data.val_shards) into OUT/NAME/eval.json
(log: eval.log). Runs go one after another, or one per GPU with --gpus 0,1,... (CUDA_VISIBLE_DEVICES; the
rest queued; a GPU listed twice takes two runs at once). The same command again keeps finished runs and
evaluations and continues unfinished runs from their last checkpoint; a run folder made with other settings is
refused.

Writes OUT/table.md, OUT/table.csv, OUT/utilization.png, OUT/recon_loss.png and, when runs have a W,
OUT/w_rank_norm.png (numerical rank, effective rank and Frobenius norm of W against steps: the paper's Fig. 4).
Exit status: 0 every run trained and evaluated (skipped kinds are named in the table), 1 a run or an
evaluation failed (the table is still written; its log is named), 2 a usage or config error (nothing run),
130 interrupted (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import re
import shlex
import shutil
import site
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

import simvq_scale
from simvq_scale.config import QUANTIZER_KINDS, ConfigError, dotted_items, load_config, to_dict
from simvq_scale.data import ShardPatternError, expand_shards
from simvq_scale.eval.comparison import (PlottingUnavailable, RunRecord, comparison_note,
                                         last_logged, markdown_table, pyplot, read_eval, write_csv, write_plots)
from simvq_scale.inference import EXPORT_NAME
from simvq_scale.train.checkpoint import CHECKPOINT_DIR
from simvq_scale.train.run_dir import CONFIG_FILE

# Every config key this tool reads or writes, in one table. The kind-specific quantizer options are moving
# into per-kind sections (quantizer.fsq.levels, quantizer.lc.features, ...): change the right-hand sides then.
# Other kind options (vq_ema decay, fc low dimension, LFQ entropy weight) are taken from the config as they are.
KEYS = {
    "kind": "quantizer.kind",
    "codebook_size": "quantizer.codebook_size",
    "fsq_levels": "quantizer.fsq.levels",
    "lc_features": "quantizer.lc.features",
    "modality": "data.modality",
    "train_shards": "data.train_shards",
    "val_shards": "data.val_shards",
    "global_batch": "train.global_batch",
    "ema_decay": "model.ema_decay",
    "steps": "train.steps",
    "out_dir": "train.out_dir",
}
TABLE1_KINDS = ("vq", "vq_ema", "fc", "fsq", "lfq", "lc", "simvq")  # the paper's Table 1, in its order

# the commands each run is made of, run as `python -m MODULE` so they work from an installed package
TRAIN = "simvq_scale.tools.train"
EVAL = "simvq_scale.tools.eval_recon"
MAKE_LC_FEATURES = "simvq_scale.tools.make_lc_features"
# where this process imported simvq_scale from: its children must import the same one (a checkout run uninstalled,
# a --target folder, an editable install)
PACKAGE_PARENT = str(Path(simvq_scale.__file__).resolve().parents[1])
FSQ_TARGET_LEVEL = 8  # levels per channel near the FSQ paper's recommended 5-8
FSQ_MAX_LEVEL = 64  # a prime factor of K above this makes no sensible FSQ channel
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PROGRESS_LINE = re.compile(r"^(step \d+/\d+ |resumed from |done: |k-means |wrote )")
LOG_TAIL_LINES = 15
RUN_INFO = "run.json"  # the device and command of the call that trained the run
EVAL_ARGS = "eval_args.json"  # the evaluation's arguments, so a changed evaluation is rerun


class UsageError(Exception):
    """A command line, config or output folder that cannot describe the comparison (exit status 2)."""


@dataclass
class PlannedRun:
    record: RunRecord
    overrides: list[str] = field(default_factory=list)  # --set items for launch/train.py
    config: dict = field(default_factory=dict)  # the resolved config, as config.yaml will hold it
    features_to_make: Path | None = None  # LC: the features file this tool makes before training


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def sets_key(overrides: list[str], dotted: str) -> bool:
    return any(item.partition("=")[0].strip() == dotted for item in overrides)


def resolve(config: str, overrides: list[str], run: str, validate: bool = True) -> dict:
    """The run's config as a dict; validated unless it still lacks its kind's options (see plan)."""
    try:
        cfg = load_config(config, overrides)
        return to_dict(cfg.validate(1) if validate else cfg)
    except ConfigError as e:
        raise UsageError(f"run {run}: {e}") from None


def fsq_levels_for(codebook_size: int) -> list[int] | None:
    """FSQ levels whose product is exactly K, about FSQ_TARGET_LEVEL each (prime factors spread over
    round(log_8 K) channels, largest first onto the smallest channel); None when K has a prime factor above
    FSQ_MAX_LEVEL or is below 2."""
    factors, rest, p = [], codebook_size, 2
    while rest > 1 and p * p <= rest:
        while rest % p == 0:
            factors.append(p)
            rest //= p
        p += 1
    if rest > 1:
        factors.append(rest)
    if not factors or max(factors) > FSQ_MAX_LEVEL:
        return None
    channels = min(len(factors), max(1, round(math.log(codebook_size) / math.log(FSQ_TARGET_LEVEL))))
    levels = [1] * channels
    for factor in sorted(factors, reverse=True):
        levels[levels.index(min(levels))] *= factor
    return sorted(levels, reverse=True)


def check_features(path: str, codebook_size: int, option: str) -> None:
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        raise UsageError(f"{option}={path}: not a readable .npy file of LC code features ({e})") from None
    if len(shape) != 2 or shape[0] != codebook_size:
        raise UsageError(f"{option}={path} holds shape {shape}; LC at K={codebook_size:,} needs "
                         f"({codebook_size}, feature_dim)")


def features_path(out: Path, config: dict) -> Path:
    """Where this tool keeps LC features made for a codebook size, data set and model geometry."""
    digest = hashlib.sha1(json.dumps([config["data"], config["model"]], sort_keys=True).encode()).hexdigest()[:10]
    return out / "lc_features" / f"K{lookup(config, KEYS['codebook_size'])}-{digest}.npy"


def kind_options(kind: str, overrides: list[str], config: dict, args) -> tuple[list[str], list[str], str, bool]:
    """(--set items, notes for the table, reason to skip or "", whether the LC features are to be made)."""
    k = lookup(config, KEYS["codebook_size"])
    sets, notes = [], []
    if kind == "fsq" and not sets_key(overrides, KEYS["fsq_levels"]) \
            and math.prod(lookup(config, KEYS["fsq_levels"])) != k:
        levels = fsq_levels_for(k)
        if levels is None:
            return [], [], (f"FSQ needs levels whose product is K={k:,}, which has a prime factor above "
                            f"{FSQ_MAX_LEVEL}: give {KEYS['fsq_levels']} in a --variant"), False
        sets.append(f"{KEYS['fsq_levels']}={json.dumps(levels)}")
        notes.append(f"levels {levels}")
    if kind == "lfq" and (k < 2 or k & (k - 1)):
        return [], [], f"LFQ needs a power-of-two codebook size; K={k:,} is not one", False
    make = False
    if kind == "lc":
        if sets_key(overrides, KEYS["lc_features"]):
            check_features(lookup(config, KEYS["lc_features"]), k, KEYS["lc_features"])
        elif args.lc_features:
            check_features(args.lc_features, k, "--lc-features")
            sets.append(f"{KEYS['lc_features']}={args.lc_features}")
        elif lookup(config, KEYS["lc_features"]):
            check_features(lookup(config, KEYS["lc_features"]), k, KEYS["lc_features"])
        else:
            sets.append(f"{KEYS['lc_features']}={features_path(args.out, config)}")
            notes.append("features: k-means of training pieces (simvq-make-lc-features)")
            make = True
    return sets, notes, "", make


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    items = shlex.split(rest)
    if not sep or not RUN_NAME.match(name) or not items or any("=" not in item for item in items):
        raise UsageError(f"--variant {text!r}: expected NAME:KEY=VALUE [KEY=VALUE ...] with NAME of letters, "
                         "digits, '_', '-', '.', e.g. k65k:quantizer.codebook_size=65536")
    return name, items


def run_list(args) -> list[tuple[str, list[str]]]:
    """(run name, its own --set items) for every run, in order."""
    variants = [parse_variant(v) for v in args.variant]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else []
    unknown = sorted(set(kinds) - set(QUANTIZER_KINDS))
    if unknown:
        raise UsageError(f"--kinds {','.join(unknown)}: not a quantizer kind; choose from {', '.join(TABLE1_KINDS)}")
    if not kinds and not variants:
        kinds = list(TABLE1_KINDS)
    if kinds and variants:  # the kind goes last, so the run's name is what it runs
        runs = [(f"{k}-{name}", [*sets, f"{KEYS['kind']}={k}"]) for k in kinds for name, sets in variants]
    elif kinds:
        runs = [(k, [f"{KEYS['kind']}={k}"]) for k in kinds]
    else:
        runs = variants
    names = [name for name, _ in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"run names appear twice: {', '.join(duplicates)} (each --kinds entry and --variant "
                         "name must be unique)")
    return runs


def plan(args) -> tuple[list[PlannedRun], dict]:
    """Every run's overrides and resolved config (nothing is run); and the shared config, for the caption."""
    common = [f"{KEYS['codebook_size']}={args.codebook_size}"] if args.codebook_size else []
    common += args.set
    steps = [f"{KEYS['steps']}={args.steps}"] if args.steps else []  # last: it wins over a variant's
    shared = resolve(args.config, common + steps, "(shared settings)", validate=False)
    planned = []
    for name, own in run_list(args):
        overrides = common + own + steps
        config = resolve(args.config, overrides, name, validate=False)  # e.g. FSQ's levels are not set yet
        kind, k = lookup(config, KEYS["kind"]), lookup(config, KEYS["codebook_size"])
        record = RunRecord(name, kind, k, lookup(config, KEYS["steps"]), args.out / name)
        sets, notes, skip, make = kind_options(kind, overrides, config, args)
        if skip:
            record.status, record.note = "skipped", skip
            planned.append(PlannedRun(record))
            continue
        overrides = overrides + sets + [f"{KEYS['out_dir']}={record.run_dir}"]
        config = resolve(args.config, overrides, name, validate=not make)  # LC features made to order come later
        record.note = "; ".join(notes)
        if lookup(config, KEYS["modality"]) != lookup(shared, KEYS["modality"]):
            raise UsageError(f"run {name}: {KEYS['modality']} differs from the other runs'; "
                             "one table holds one modality")
        to_make = Path(lookup(config, KEYS["lc_features"])) if make else None
        planned.append(PlannedRun(record, overrides, config, to_make))
    return planned, shared


def check_existing(run: PlannedRun) -> None:
    """A run folder from an earlier call must hold the same run (train.steps may grow: it continues)."""
    path = run.record.run_dir / CONFIG_FILE
    if run.record.status != "ok" or not path.is_file():
        return
    old, new = dotted_items(yaml.safe_load(path.read_text()) or {}), dotted_items(run.config)
    missing = object()
    differs = sorted(k for k in old.keys() | new.keys()
                     if k not in (KEYS["steps"], KEYS["out_dir"]) and old.get(k, missing) != new.get(k, missing))
    if differs:
        shown = ", ".join(f"{k} ({old.get(k, 'absent')!r} there, {new.get(k, 'absent')!r} now)" for k in differs[:4])
        raise UsageError(f"{run.record.run_dir} holds a run made with other settings: {shown}"
                         f"{' ...' if len(differs) > 4 else ''}. Give another --out, or delete that folder to redo it")
    if old.get(KEYS["steps"], 0) > run.record.steps:
        raise UsageError(f"{run.record.run_dir} was planned for {old[KEYS['steps']]:,} steps, more than the "
                         f"{run.record.steps:,} asked now: pass --steps {old[KEYS['steps']]} or another --out")


def check_shards(runs: list[PlannedRun], val_shards: str) -> None:
    for pattern, what in [(lookup(r.config, KEYS["train_shards"]), KEYS["train_shards"]) for r in runs if r.config] \
            + [(val_shards, "--val-shards")]:
        try:
            expand_shards(pattern)
        except ShardPatternError as e:
            raise UsageError(f"{what}: {e}") from None


def training_done(run_dir: Path, steps: int) -> bool:
    """metrics.jsonl reached the planned step and generator_ema.pt was written after that log line."""
    last = last_logged(run_dir)
    export = run_dir / EXPORT_NAME
    return last is not None and last[0] >= steps and export.is_file() and export.stat().st_mtime >= last[1]


def evaluation_done(run_dir: Path, steps: int, eval_args: list[str]) -> bool:
    report, saved = read_eval(run_dir), run_dir / EVAL_ARGS
    return (report is not None and report.get("step") == steps and saved.is_file()
            and json.loads(saved.read_text()) == eval_args)


def describe_device(gpu: str | None) -> str:
    """The card a run uses (nvidia-smi's name, so this process never opens a CUDA context), or the CPU."""
    import torch

    if not torch.cuda.is_available():  # --gpus on a machine without CUDA only sets how many runs go at once
        return f"CPU ({os.cpu_count()} cores)"
    index = gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            return f"1x {done.stdout.strip()}"
    return f"1x GPU {index}"


class Console:
    """Progress lines of parallel runs, one whole line at a time, each prefixed with its run."""

    def __init__(self):
        self.lock = threading.Lock()

    def say(self, who: str, text: str) -> None:
        with self.lock:
            for line in text.splitlines():
                print(f"[{who}] {line}", flush=True)


class Runner:
    """Trains and evaluates planned runs in GPU slots (or one CPU/default-device slot), teeing every log."""

    def __init__(self, args, runs: list[PlannedRun], eval_args: list[str], console: Console):
        self.args, self.runs, self.eval_args, self.console = args, runs, eval_args, console
        self.processes: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.feature_locks: dict[Path, threading.Lock] = {}
        self.stopping = False

    def child_env(self, gpu: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        if PACKAGE_PARENT not in (*site.getsitepackages(), site.getusersitepackages()):  # those every child has
            env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def logged(self, cmd: list[str], log_path: Path, env: dict, who: str) -> int:
        """Run cmd with its stdout and stderr appended to log_path; its progress lines on the console."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(map(str, cmd))}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return 130
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        errors="replace")
                self.processes.add(proc)
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if PROGRESS_LINE.match(line):
                    self.console.say(who, line.rstrip())
            rc = proc.wait()
            with self.lock:
                self.processes.discard(proc)
        return rc

    def failed(self, run: PlannedRun, who: str, what: str, rc: int, log_path: Path) -> None:
        if self.stopping:  # terminated by an interrupt, not failed: the next call continues it
            return
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        self.console.say(who, f"{what} failed (exit status {rc}); the end of {log_path}:\n" + "\n".join(tail))
        run.record.status, run.record.note = "failed", f"{what} exited with status {rc}; see {log_path}"

    def make_features(self, run: PlannedRun, env: dict, who: str) -> bool:
        path = run.features_to_make
        with self.lock:
            lock = self.feature_locks.setdefault(path, threading.Lock())
        with lock:  # runs sharing a features file wait for the one that makes it
            if path.is_file():
                return True
            log_path = path.with_suffix(".log")
            self.console.say(who, f"making LC features {path} (log {log_path})")
            cmd = [sys.executable, "-m", MAKE_LC_FEATURES, "--config", self.args.config, "--out", str(path),
                   "--set", *run.overrides]
            rc = self.logged(cmd, log_path, env, who)
            if rc != 0:
                self.failed(run, who, "making the LC features", rc, log_path)
            return rc == 0

    def process(self, run: PlannedRun, gpu: str | None, who: str) -> None:
        record, env = run.record, self.child_env(gpu)
        run_dir, info_path = record.run_dir, record.run_dir / RUN_INFO
        if training_done(run_dir, record.steps):
            self.console.say(who, f"trained earlier to step {record.steps:,}: kept")
        else:
            if run.features_to_make is not None and not self.make_features(run, env, who):
                return
            device = describe_device(gpu)
            log_path = run_dir / "train.log"
            self.console.say(who, f"training {record.kind} (K={record.codebook_size:,}, {record.steps:,} steps) "
                                  f"on {device}; log {log_path}")
            cmd = [sys.executable, "-m", TRAIN, "--config", self.args.config, "--resume", "auto",
                   "--set", *run.overrides]
            start = time.time()
            rc = self.logged(cmd, log_path, env, who)
            if rc != 0:
                self.failed(run, who, "training", rc, log_path)
                return
            if not training_done(run_dir, record.steps):
                record.status = "failed"
                record.note = f"training ended without reaching step {record.steps:,}; see {log_path}"
                self.console.say(who, record.note)
                return
            info_path.write_text(json.dumps({"device": device, "gpu": gpu, "command": cmd,
                                             "wall_s": time.time() - start}) + "\n")
        record.device = json.loads(info_path.read_text())["device"] if info_path.is_file() else ""
        if evaluation_done(run_dir, record.steps, self.eval_args):
            self.console.say(who, "evaluated earlier: kept")
        else:
            log_path = run_dir / "eval.log"
            self.console.say(who, f"evaluating on {self.args.val_shards} (log {log_path})")
            cmd = [sys.executable, "-m", EVAL, "--checkpoint", str(run_dir), *self.eval_args,
                   "--out", str(run_dir / "eval.json"), "--no-progress"]
            rc = self.logged(cmd, log_path, env, who)
            if rc != 0:
                self.failed(run, who, "evaluation", rc, log_path)
                return
            (run_dir / EVAL_ARGS).write_text(json.dumps(self.eval_args) + "\n")
        metrics = read_eval(run_dir)["metrics"]
        self.console.say(who, "eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))

    def run_all(self) -> None:
        todo: queue.Queue = queue.Queue()
        active = [r for r in self.runs if r.record.status == "ok"]
        for i, run in enumerate(active):
            todo.put((i, run))

        def slot(gpu: str | None) -> None:
            while not self.stopping:
                try:
                    i, run = todo.get_nowait()
                except queue.Empty:
                    return
                self.process(run, gpu, f"{run.record.name} {i + 1}/{len(active)}")

        gpus = self.args.gpus.split(",") if self.args.gpus else [None]
        threads = [threading.Thread(target=slot, args=(gpu,), daemon=True) for gpu in gpus]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.5)
        except KeyboardInterrupt:
            with self.lock:
                self.stopping = True
                for proc in self.processes:
                    proc.terminate()
            for thread in threads:
                thread.join(timeout=30)
            raise


def ema_warning(shared: dict, steps: int) -> str:
    """A sentence when the evaluated EMA exports would still be mostly the initial weights (decay^steps of them
    is left after `steps` steps; e.g. 78% at decay 0.999 after 250 steps), else ''."""
    decay = float(lookup(shared, KEYS["ema_decay"]))
    left = decay ** steps
    if left <= 0.05:
        return ""
    return (f"The EMA exports that are evaluated still hold {left:.0%} of the initial weights after {steps:,} steps "
            f"at {KEYS['ema_decay']}={decay}; for short comparisons lower it (e.g. --set {KEYS['ema_decay']}="
            f"{1 - 5 / steps:.3g}).")


def caption(args, shared: dict, records: list[RunRecord]) -> str:
    steps = sorted({r.steps for r in records})
    samples = sorted({report["samples"] for r in records if r.status == "ok" and (report := read_eval(r.run_dir))})
    devices = sorted({r.device for r in records if r.device})
    warning = ema_warning(shared, min(steps)) if steps else ""
    return (f"Runs of `{args.config}` ({lookup(shared, KEYS['modality'])}; "
            f"{'/'.join(f'{s:,}' for s in steps)} steps, global batch {lookup(shared, KEYS['global_batch'])}), "
            f"trained on `{lookup(shared, KEYS['train_shards'])}`; each EMA export evaluated by simvq-eval "
            f"on `{args.val_shards}` ({'/'.join(map(str, samples)) or 'no'} samples); "
            f"device: {'; '.join(devices) or 'not recorded'}. Utilization and perplexity count the codes chosen over "
            f"the evaluation set, train utilization and perplexity those of the trainer's usage window at its last "
            f"logged step; {comparison_note(lookup(shared, KEYS['modality']))}. "
            + (f"{warning} " if warning else "") + "Made by simvq-compare-quantizers.")


def write_report(args, runs: list[PlannedRun], shared: dict) -> list[Path]:
    records = [r.record for r in runs]
    modality = lookup(shared, KEYS["modality"])
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records, modality, caption(args, shared, records))
    (args.out / "table.md").write_text(table)
    write_csv(records, modality, args.out / "table.csv")
    print(table, flush=True)
    written = [args.out / "table.md", args.out / "table.csv"]
    if not args.no_plots:
        written += write_plots(records, modality, args.out)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="the one run config every run starts from (a file, or a packaged config by name)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs (OUT/NAME), table and plots")
    parser.add_argument("--kinds", default="", help=f"comma-separated quantizer kinds (default without --variant: "
                        f"{','.join(TABLE1_KINDS)})")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE [KEY=VALUE ...]",
                        help="a named run with its own overrides (repeatable; crossed with --kinds when both "
                        "are given)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, as for launch/train.py")
    parser.add_argument("--codebook-size", type=int, default=0, help="K for every run (default: the config's)")
    parser.add_argument("--steps", type=int, default=0, help="training steps of every run (overrides train.steps)")
    parser.add_argument("--gpus", default="", help="one run per listed GPU at a time, e.g. 0,1,2,3; a GPU "
                        "listed n times runs n at once, e.g. 0,0,0,0 for small runs on one large card "
                        "(default: one run at a time on the default device)")
    parser.add_argument("--lc-features", default="", help="(K, features) .npy for LC (default: the config's "
                        "quantizer.lc_features, else made from the training data by simvq-make-lc-features)")
    parser.add_argument("--val-shards", default="", help="evaluation shards (default: the config's data.val_shards)")
    parser.add_argument("--no-plots", action="store_true", help="write the table and CSV only (no matplotlib needed)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and their state; run nothing")
    evaluation = parser.add_argument_group("evaluation (passed to simvq-eval)")
    evaluation.add_argument("--skip", default="", help="metrics not to compute, e.g. lpips_vgg,lpips_alex,rfid")
    evaluation.add_argument("--lpips-vgg", default="")
    evaluation.add_argument("--lpips-alex", default="")
    evaluation.add_argument("--fid-inception", default="")
    evaluation.add_argument("--utmos-weights", default="")
    evaluation.add_argument("--max-samples", type=int, default=0, help="first N evaluation samples (default: all)")
    evaluation.add_argument("--eval-batch-size", type=int, default=32)
    evaluation.add_argument("--eval-workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps < 0 or args.codebook_size < 0 or args.max_samples < 0:
        parser.error("--steps, --codebook-size and --max-samples must be >= 0")
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    if any(not g for g in gpus):
        parser.error(f"--gpus {args.gpus!r}: a comma-separated list of GPU ids, e.g. 0,1,2,3 (or 0,0 for two "
                     "runs at once on GPU 0)")
    return args


def evaluation_arguments(args) -> list[str]:
    given = [("--data", args.val_shards), ("--skip", args.skip), ("--lpips-vgg", args.lpips_vgg),
             ("--lpips-alex", args.lpips_alex), ("--fid-inception", args.fid_inception),
             ("--utmos-weights", args.utmos_weights), ("--max-samples", args.max_samples or ""),
             ("--batch-size", args.eval_batch_size), ("--workers", args.eval_workers)]
    return [item for option, value in given if value != "" for item in (option, str(value))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.no_plots:
            pyplot()  # missing matplotlib stops the call now, not after hours of training
        runs, shared = plan(args)
        args.val_shards = args.val_shards or lookup(shared, KEYS["val_shards"])
        if not args.val_shards:
            raise UsageError(f"no evaluation shards: pass --val-shards PATTERN or set {KEYS['val_shards']}")
        check_shards(runs, args.val_shards)
        for run in runs:
            check_existing(run)
    except (UsageError, PlottingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eval_args = evaluation_arguments(args)
    for run in runs:
        r = run.record
        state = (f"skipped: {r.note}" if r.status == "skipped" else "trained" if training_done(r.run_dir, r.steps)
                 else "continues from its checkpoint" if (r.run_dir / CHECKPOINT_DIR / "latest").is_file() else "new")
        print(f"{r.name}: {r.kind}, K={r.codebook_size:,}, {r.steps:,} steps -> {r.run_dir} ({state})")
        if args.dry_run and run.overrides:
            print("  --set " + shlex.join(run.overrides))
    warning = ema_warning(shared, min(run.record.steps for run in runs))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    console = Console()
    try:
        Runner(args, runs, eval_args, console).run_all()
    except KeyboardInterrupt:
        print("interrupted: the same command continues (finished runs are kept, the others resume from their "
              "last checkpoint)", file=sys.stderr)
        return 130
    written = write_report(args, runs, shared)
    print("wrote " + ", ".join(map(str, written)), flush=True)
    failed = [r.record.name for r in runs if r.record.status == "failed"]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see their logs, named in the table); the "
              "same command retries them and keeps the finished ones", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
