"""Benchmark the real training step: the Trainer's train_step, a default and baseline variants, one process.

    python tools/bench_train.py --config configs/image_262k.yaml --steps 30
    python tools/bench_train.py --config configs/image_262k.yaml --set quantizer.codebook_size=1048576 \\
        --baseline eager-fp32:train.compile=false,train.precision=fp32
    python tools/bench_train.py --config configs/audio_262k.yaml --set train.global_batch=20 --steps 30

Each variant builds the real Trainer (models, quantizer, both DeepSpeed engines, the metrics) from the
config plus its overrides, and times `Trainer.train_step` (G step, D step, EMA update) on synthetic
batches already on the device (images uniform in [-1, 1]; audio 0.1 N(0, 1) clipped, as the reference
harness feeds them), so the figure is the step, not the loader; `--data real` feeds the config's shards
through the real loader instead (its wait is then part of the step). The first `--warmup` steps (compile,
cuDNN autotuning) are excluded; the timed steps run back to back and are measured between two device
synchronizations. Printed: a table and one JSON line per variant with samples_per_s (audio: seconds of
audio per second as well), step_ms, host_issue_ms (the host's time to issue a step: well below step_ms, the
device sets the pace), peak_mem_gib (max allocated over the variant), model_tflops_per_gpu
and mfu by the trainer's FLOP count, compile_s (the warm-up steps' time above the steady step time),
first_step_s, and the default/baseline ratio; with --profile also the device kernel time per step by kind
(convolutions, layout transposes, compiled fused kernels, search, optimizer, copies) and the device's idle
time per step by the phase of train_step the host was in when the GPU resumed (the profiler slows the host,
so these idle figures run higher than in the timed steps: read them as where, not how much), the host's time
per step in each phase, and the host's Python functions by their own time (cProfile, DIR/NAME.host.txt);
with --find-syncs the host syncs of one step by caller, explicit synchronize calls included (GPU only).
The default variant is the config as given; each --baseline NAME:KEY=VALUE,KEY=VALUE adds a variant (e.g.
today's eager path). Runs on one process (world size 1; plain python, no launcher); CPU works for a smoke test.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

import simvq_scale
from simvq_scale import distributed
from simvq_scale.config import CONFIG_HELP, ConfigError, load_config
from simvq_scale.train.logging import Ticker


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--baseline {text!r} is not NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, [item for item in overrides.split(",") if item]


def synthetic_batch(trainer, generator: torch.Generator) -> torch.Tensor:
    shape = (trainer.micro_batch * trainer.accumulation, *trainer.sample_shape)
    if len(shape) == 4:  # images in [-1, 1]
        return torch.rand(shape, generator=generator, device=trainer.device) * 2 - 1
    return (0.1 * torch.randn(shape, generator=generator, device=trainer.device)).clamp(-1, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, config: str, overrides: list[str], args, device: torch.device) -> dict:
    from simvq_scale.train.trainer import Trainer

    cfg = load_config(config, [*args.set, *overrides, f"train.out_dir={args.out_dir}/{name}"])
    cfg.validate(distributed.world_size())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    print(f"[{name}] building the trainer ({' '.join(overrides) or 'the config as given'}) ...", flush=True)
    trainer = Trainer(cfg, device)
    trainer.engine_g.train()
    trainer.engine_d.train()
    generator = torch.Generator(device=device).manual_seed(0)
    pool = [trainer.to_device(synthetic_batch(trainer, generator)) for _ in range(4)]
    batches = iter(trainer.loader) if args.data == "real" else None

    def batch(i: int) -> torch.Tensor:
        if batches is None:
            return pool[i % len(pool)]
        return trainer.to_device(next(batches)["x"])

    warmup_times = []
    for i in range(args.warmup):
        start = time.perf_counter()
        with Ticker(lambda line: print(line, flush=True), f"[{name}] warm-up step 1 (compiling, autotuning)") \
                if i == 0 else nullcontext():
            trainer.train_step(batch(i))
            synchronize(device)
        warmup_times.append(time.perf_counter() - start)
        print(f"[{name}] warm-up step {i + 1}/{args.warmup}: {warmup_times[-1]:.2f} s", flush=True)
    synchronize(device)
    fallbacks_before = int(trainer.quantizer.search_fallbacks)
    start = time.perf_counter()
    for i in range(args.steps):
        trainer.train_step(batch(i))
    issued = time.perf_counter() - start  # the host's time to issue the steps (it waits only on a full launch queue)
    synchronize(device)
    elapsed = time.perf_counter() - start
    # tokens the fused search had to re-scan in full fp32 (its exactness fallback): a cost that depends on the data
    fallbacks = (int(trainer.quantizer.search_fallbacks) - fallbacks_before) / args.steps
    tokens = cfg.train.global_batch * trainer.tokens_per_sample
    print(f"[{name}] search fallbacks: {fallbacks:.1f} tokens per step of {tokens}"
          + (" (the fp32 re-scan is part of the step time: with synthetic input, compare with --data real)"
             if fallbacks > 0.01 * tokens else ""), flush=True)
    # a few more steps under the profiler, after (and apart from) the timed ones
    kernel_ms, idle_ms, host_ms = profile_steps(trainer, batch, name, args, device) if args.profile else ({}, {}, {})
    find_syncs = args.find_syncs and device.type == "cuda"
    syncs = host_syncs(lambda: trainer.train_step(batch(0)), name) if find_syncs else None
    step_s = elapsed / args.steps
    samples = cfg.train.global_batch
    unit = trainer.modality.samples_per_unit(cfg.data)
    tflops = samples * trainer.flops_per_sample / step_s / 1e12
    from simvq_scale.train.flops import peak_flops
    from simvq_scale.train.metrics import max_memory_gib

    peak = peak_flops(device)
    row = {
        "variant": name, "overrides": overrides, "modality": cfg.data.modality,
        "codebook_size": cfg.quantizer.codebook_size, "batch": samples,
        "precision": "bf16" if trainer.bf16 else "fp32", "compile": trainer.compiled,
        "samples_per_s": samples / step_s, "units_per_s": samples * unit / step_s,
        "unit": trainer.modality.sample_noun, "step_ms": 1000 * step_s,
        "host_issue_ms": 1000 * issued / args.steps,  # well below step_ms: the device sets the pace
        "peak_mem_gib": max_memory_gib(device), "model_tflops_per_gpu": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "first_step_s": warmup_times[0] if warmup_times else None,
        "compile_s": sum(t - step_s for t in warmup_times) if warmup_times else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        # the simvq_scale that ran: tools/bench_train.py puts its own checkout first on sys.path, so comparing
        # another version means running that version's tools/bench_train.py (or its module from elsewhere)
        "package": str(Path(simvq_scale.__file__).parent),
        "steps": args.steps, "warmup": args.warmup, "data": args.data,
        "kernel_ms_per_step": kernel_ms,  # by kind, from --profile (empty without it, or on a CPU)
        "device_idle_ms_per_step": idle_ms,  # by the step phase the host was in, from --profile (likewise)
        "host_ms_per_step": host_ms,  # the host's time in each step phase, under the profiler, from --profile
        "host_syncs_per_step": syncs,  # from --find-syncs (None without it, or on a CPU)
        "search_fallbacks_per_step": fallbacks, "tokens_per_step": tokens,
    }
    del trainer, pool, batches
    gc.collect()
    return row


# Device kernels by what they do, first match wins (substrings of the kernel names seen in H200 profiles of the
# image and audio steps): the summary that says whether layout transposes or launches are where the time goes.
KERNEL_KINDS = (
    ("layout transposes", ("nchwToNhwc", "nhwcToNchw")),
    ("compiled fused kernels", ("triton_",)),  # before "conv": inductor names them after the ops they fuse
    ("convolutions", ("fprop", "dgrad", "wgrad", "conv")),
    ("matrix products", ("gemm", "cutlass", "cublas")),
    ("codebook search", ("_best_tiles", "_fallback_kernel", "_rerank_kernel", "_fp16_rows", "nearest")),
    ("optimizer", ("multi_tensor", "adam", "Adam")),
    ("copies and casts", ("Memcpy", "Memset", "copy", "CatArrayBatched")),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, keys in KERNEL_KINDS if any(key in name for key in keys)), "other kernels")


def kernel_time_by_kind(kernels: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """(kernel name, device microseconds) -> milliseconds per step for each kind, with "total", largest first."""
    per_kind: dict[str, float] = {}
    for kernel_name, us in kernels:
        kind = kernel_kind(kernel_name)
        per_kind[kind] = per_kind.get(kind, 0.0) + us / 1000 / steps
    return largest_first_with_total(per_kind)


def largest_first_with_total(ms_by_key: dict[str, float]) -> dict[str, float]:
    return dict(sorted(ms_by_key.items(), key=lambda item: -item[1])) | {"total": sum(ms_by_key.values())}


def profile_steps(trainer, batch, name: str, args, device: torch.device) -> tuple[dict, dict, dict]:
    """Profile --profile-steps more steps: the op table to DIR/NAME.txt; returns device kernel time per step by
    kind, device idle time per step by step phase (both empty on a CPU, which runs no kernels) and the host's
    time per step in each phase. Then as many steps again under cProfile: the host's Python functions by their
    own time to DIR/NAME.host.txt (what to cut when the host, not the device, sets the step time)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for i in range(args.profile_steps):
            trainer.train_step(batch(i))
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows)
    events = profiler.events()
    kernels = device_kernels(events)
    by_kind = kernel_time_by_kind(kernels, args.profile_steps) if kernels else {}
    idle = idle_time_by_phase(events, args.profile_steps)
    host = host_time_by_phase(events, args.profile_steps)
    summary = "\n".join(f"  {kind:<24} {ms:8.2f} ms/step" for kind, ms in by_kind.items())
    if idle:
        summary += "\ndevice idle, by the step phase the host was in when the GPU resumed:\n" + "\n".join(
            f"  {phase:<24} {ms:8.2f} ms/step" for phase, ms in idle.items())
    summary += "\nhost time, by step phase (under the profiler):\n" + "\n".join(
        f"  {phase:<24} {ms:8.2f} ms/step" for phase, ms in host.items())
    transposes = format_transpose_sources(transpose_sources(events, args.profile_steps))
    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(table + "\n\ndevice kernels by kind:\n" + summary
                                        + ("\n\n" + transposes if transposes else ""))
    print(f"[{name}] profile of {args.profile_steps} steps ({folder / name}.txt):\n{table}", flush=True)
    print(f"[{name}] device kernels by kind:\n{summary}", flush=True)
    if transposes:
        print(f"[{name}] {transposes}", flush=True)
    python_profile = cProfile.Profile()
    with python_profile:
        for i in range(args.profile_steps):
            trainer.train_step(batch(i))
        synchronize(device)
    text = io.StringIO()
    pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(args.profile_rows)
    (folder / f"{name}.host.txt").write_text(text.getvalue())
    print(f"[{name}] the host's Python functions by own time, {args.profile_steps} steps under cProfile: "
          f"{folder / name}.host.txt", flush=True)
    return by_kind, idle, host


def step_phases(events) -> list[tuple[float, float, str]]:
    """(start, end, phase) of the host's Trainer.train_step phases (its STEP_PHASE profiler ranges), by start."""
    from torch.autograd import DeviceType

    from simvq_scale.train.trainer import STEP_PHASE

    return sorted((e.time_range.start, e.time_range.end, e.name.removeprefix(STEP_PHASE)) for e in events
                  if e.device_type == DeviceType.CPU and e.name.startswith(STEP_PHASE))


def host_time_by_phase(events, steps: int) -> dict[str, float]:
    """Milliseconds per step the host spent in each phase of Trainer.train_step, with a total: a total near the
    step time says the host, not the device, sets the pace."""
    host: dict[str, float] = {}
    for start, end, phase in step_phases(events):
        host[phase] = host.get(phase, 0.0) + (end - start) / 1000 / steps
    return largest_first_with_total(host) if host else {}


def idle_time_by_phase(events, steps: int) -> dict[str, float]:
    """Milliseconds per step the device sat idle, by the phase of Trainer.train_step (its STEP_PHASE profiler
    ranges) the host was in when the next kernel started: the host work the GPU waited for. A gap that ends
    outside every phase is "between steps" (the benchmark's loop). Kernels of all streams count as busy."""
    busy = sorted((e.time_range.start, e.time_range.end) for e in device_kernel_events(events))
    phases = step_phases(events)
    phase_starts = [start for start, _, _ in phases]
    idle: dict[str, float] = {}
    busy_until = busy[0][1] if busy else 0.0
    for start, end in busy[1:]:
        if start > busy_until:
            i = bisect.bisect_right(phase_starts, start) - 1
            phase = phases[i][2] if i >= 0 and phases[i][1] >= start else "between steps"
            idle[phase] = idle.get(phase, 0.0) + (start - busy_until) / 1000 / steps
        busy_until = max(busy_until, end)
    return largest_first_with_total(idle) if idle else {}


def host_syncs(step: Callable[[], None], name: str) -> int:
    """Run `step` once with CUDA's sync debug mode on and count the ops that made the host wait for the device
    (a .item(), a tensor's truth value, a copy to the host) and the explicit torch.cuda.synchronize calls, which
    the debug mode does not report (DeepSpeed's throughput timer made 5 per image step), by the innermost frame
    outside torch (and DeepSpeed's accelerator wrapper) that called them; print them and return the total. Each
    one drains the launch queue: the host can no longer run ahead of the device, and every host-bound stretch
    after it shows as device idle time."""
    synchronize = torch.cuda.synchronize

    def announced_synchronize(*args, **kwargs):
        warnings.warn("torch.cuda.synchronize")
        return synchronize(*args, **kwargs)

    torch.cuda.set_sync_debug_mode("warn")
    torch.cuda.synchronize = announced_synchronize
    try:
        sites = warnings_by_caller(step, skip=("/torch/", "/warnings.py", " in announced_synchronize",
                                               "/accelerator/"))
    finally:
        torch.cuda.synchronize = synchronize
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    lines = "\n".join(f"  {count:4d}  {site}" for site, count in sites.most_common())
    print(f"[{name}] host syncs in one step: {sum(sites.values())}" + (f", by caller:\n{lines}" if lines else ""),
          flush=True)
    return sum(sites.values())


def warnings_by_caller(run: Callable[[], None], skip: tuple[str, ...] = ("/torch/", "/warnings.py")) -> Counter:
    """The warnings raised while `run` runs, counted by their innermost calling frame whose "path in function"
    contains none of `skip`; each site is "path:line in function", the path from its site-packages or checkout
    folder on."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        outside = [f for f in frames if not any(part in f"{f.filename} in {f.name}" for part in skip)]
        caller = (outside or frames)[-1]
        short = caller.filename.split("site-packages/")[-1]
        short = "simvq_scale/" + short.split("/simvq_scale/")[-1] if "/simvq_scale/" in short else short
        sites[f"{short}:{caller.lineno} in {caller.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        run()
    return sites


def device_kernels(events) -> list[tuple[str, float]]:
    """(kernel name, device microseconds) of a profile's device kernels; the compiled graphs' ranges on the device
    timeline ("## Call CompiledFxGraph") are annotations, not kernels."""
    return [(event.name, event.self_device_time_total) for event in device_kernel_events(events)]


def device_kernel_events(events) -> list:
    """The profile's events that are device work (kernels, copies), not annotations on the device timeline."""
    from torch.autograd import DeviceType

    return [event for event in events if event.device_type == DeviceType.CUDA and not event.is_user_annotation]


def transpose_sources(events, steps: int) -> list[dict]:
    """Which ops launched the layout transposes: (region, op, its first two input shapes) -> calls and ms per
    step, largest first. The region is the outermost op above (a compiled graph, its backward, or an eager
    module's autograd node), so a transpose inside a compiled network and one in an eager network tell apart."""
    groups: dict[tuple, dict] = {}
    for event in events:
        launched = [k for k in getattr(event, "kernels", []) if kernel_kind(k.name) == "layout transposes"]
        if not launched:
            continue
        op = event
        while op.cpu_parent is not None and not (op.name.startswith("aten::") and op.input_shapes):
            op = op.cpu_parent
        region = op
        while region.cpu_parent is not None:
            region = region.cpu_parent
        shapes = tuple(tuple(shape) for shape in op.input_shapes[:2] if shape)
        group = groups.setdefault((region.name[:48], op.name, shapes), {"calls": 0.0, "ms": 0.0})
        group["calls"] += len(launched) / steps
        group["ms"] += sum(k.duration for k in launched) / 1000 / steps
    return [{"region": region, "op": op, "shapes": shapes, **figures}
            for (region, op, shapes), figures in sorted(groups.items(), key=lambda item: -item[1]["ms"])]


def format_transpose_sources(sources: list[dict], rows: int = 12) -> str:
    if not sources:
        return ""
    lines = ["layout transposes by the op that launched them (per step):"]
    lines += [f"  {s['ms']:7.2f} ms {s['calls']:6.1f} calls  {s['region']:<48} {s['op']:<28} "
              + " ".join(str(list(shape)) for shape in s["shapes"]) for s in sources[:rows]]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = (f"{'variant':<18} {'K':>9} {'batch':>5} {'prec':>4} {'comp':>4} {'units/s':>9} {'step ms':>8} "
            f"{'mem GiB':>7} {'TFLOP/s':>7} {'MFU':>5} {'first s':>7} {'vs default':>10}")
    base = rows[0]["units_per_s"]
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{r['variant']:<18} {r['codebook_size']:>9} {r['batch']:>5} {r['precision']:>4} "
                     f"{'yes' if r['compile'] else 'no':>4} {r['units_per_s']:>9.1f} {r['step_ms']:>8.1f} "
                     f"{r['peak_mem_gib']:>7.1f} {r['model_tflops_per_gpu']:>7.1f} {mfu:>5} "
                     f"{r['first_step_s'] or 0:>7.1f} {base / r['units_per_s']:>9.2f}x")
    lines.append(f"units: {rows[0]['unit']} per second; device: {rows[0]['device']}; 'vs default' = first row / variant")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for every variant, e.g. train.global_batch=64")
    parser.add_argument("--baseline", action="append", type=parse_variant, default=[], metavar="NAME:K=V,K=V",
                        help="a variant measured after the default in the same process (repeatable)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--out-dir", default="runs/bench_train", help="run folders of the variants (nothing is written "
                                                                      "there unless a variant logs or saves)")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="after timing, profile --profile-steps more steps of each variant (table per variant)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=40)
    parser.add_argument("--find-syncs", action="store_true",
                        help="after timing, run one step in CUDA's sync debug mode and list what made the host wait")
    parser.add_argument("--json", default="", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    try:
        load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = distributed.init_distributed()
    if distributed.world_size() != 1:
        print("error: bench_train times one process; run it without a launcher", file=sys.stderr)
        return 2
    rows = []
    failed = 0
    for name, overrides in [("default", []), *args.baseline]:
        try:
            row = run_variant(name, args.config, overrides, args, device)
        except Exception as error:  # noqa: BLE001 - one variant's failure must not lose the others' figures
            failed += 1
            print(f"[{name}] FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row["default_over_variant"] = (rows[0] if rows else row)["units_per_s"] / row["units_per_s"]
        rows.append(row)
        line = json.dumps({"bench": "train", **row})
        print(line, flush=True)  # each variant as soon as it is measured: a later failure loses nothing
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    if rows:
        print(format_table(rows), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
