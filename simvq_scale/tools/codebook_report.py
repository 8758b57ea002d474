"""Codebook report of a tokenizer over a shard set: how often each code is chosen, and the spectrum of W.

    python tools/codebook_report.py --checkpoint runs/image_65k --data 'val/imagenet-val-*.tar' --out report/
    torchrun --nproc_per_node 8 tools/codebook_report.py ...      # counts summed over ranks

Writes, in --out:
  code_frequency.png   code counts sorted from most to least used, log scale (unused codes are left off the
                       log axis; their number is in the title)
  w_spectrum.png       singular values of SimVQ's projection W (log scale), when the quantizer has one
  codebook_report.json utilization (fraction of codes used at least once), perplexity, dead codes,
                       top-1% share, the sorted counts, and W's singular values, numerical and effective rank
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from simvq_scale import distributed
from simvq_scale.eval.runner import (WHOLE_SET_WINDOW, add_common_arguments, encoded_batches, finish_tool,
                                     global_code_counts, start_tool, tool_loader)
from simvq_scale.quant.stats import CodebookUsage, weight_spectrum
from simvq_scale.tools.user_errors import reports_user_errors


def plot_frequency(counts: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = counts.sort(descending=True).values
    used = int((ordered > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(torch.arange(1, used + 1).numpy(), ordered[:used].numpy(), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("times chosen")
    ax.set_title(f"code frequency: {used} of {counts.numel()} codes used, {counts.numel() - used} unused")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(singular_values: torch.Tensor, spectrum: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(torch.arange(1, singular_values.numel() + 1).numpy(), singular_values.numpy(), marker=".", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of W")
    ax.set_title(f"W spectrum: rank {spectrum['rank']}/{singular_values.numel()} (relative tolerance 1e-2), "
                 f"effective rank {spectrum['effective_rank']:.1f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for the PNGs and codebook_report.json")
    args = parser.parse_args(argv)
    tokenizer = start_tool(args.checkpoint, args.device)
    loader = tool_loader(tokenizer, args)
    usage = CodebookUsage(tokenizer.codebook_size, WHOLE_SET_WINDOW)
    samples = 0
    for keys, _, ids in encoded_batches(tokenizer, loader, progress=not args.no_progress, desc="codes"):
        samples += len(keys)
        if keys:
            usage.update(ids)
    figures = usage.reduce()  # collectives: every rank
    counts = global_code_counts(usage)
    samples = int(distributed.all_reduce_sum(torch.tensor([samples], dtype=torch.long, device=tokenizer.device)).item())
    if distributed.is_main():
        write_report(tokenizer, figures, counts, samples, Path(args.out))
    finish_tool()
    return 0


def write_report(tokenizer, figures: dict, counts: torch.Tensor, samples: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": tokenizer.source, "step": tokenizer.step, "codebook_size": tokenizer.codebook_size,
              "samples": samples, "tokens": int(figures.pop("window_tokens")), **figures,
              "sorted_counts": counts.sort(descending=True).values.tolist()}
    plot_frequency(counts, out / "code_frequency.png")
    weight = tokenizer.generator.quantizer.projection_weight()
    if weight is None:
        report["w_spectrum"] = f"unavailable ({type(tokenizer.generator.quantizer).__name__} has no projection W)"
    else:
        spectrum = weight_spectrum(weight)
        values = spectrum.pop("singular_values")
        report["w_spectrum"] = {**spectrum, "singular_values": values.tolist()}
        plot_spectrum(values, spectrum, out / "w_spectrum.png")
    (out / "codebook_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"utilization {report['utilization']:.4f}, perplexity {report['perplexity']:.1f} over "
          f"{report['tokens']} tokens of {report['samples']} samples; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
