"""Evaluate a tokenizer's reconstructions over an evaluation shard set: codebook utilization as the
paper defines it (fraction of the K codes used at least once over the set), perplexity, and
  images: PSNR (mean of per-image values), SSIM (the paper's convention unless --ssim-convention says otherwise),
          LPIPS (VGG, AlexNet), rFID (InceptionV3 pool features);
  audio:  PESQ-WB at 16 kHz, STOI, mel distance, V/UV F1 (CREPE voicing, as the reference), UTMOS (with
          --utmos-weights). PESQ, STOI and V/UV F1 need the audio-eval extra (pip install 'simvq-scale[audio-eval]');
          without it they are reported unavailable.

    python tools/eval_recon.py --checkpoint runs/image_65k --data 'val/imagenet-val-{000000..000049}.tar' \
        --out runs/image_65k/eval.json
    torchrun --nproc_per_node 8 tools/eval_recon.py ...     # each sample read by one rank, figures reduced

Writes the report as JSON (--out) and a Markdown table next to it (.md), and prints the table; the report says
how each figure was computed (its notes, and the table's "how" column).
Metric networks are read from local files only (tools/fetch_metric_weights.py makes them); a metric
whose default file is missing is reported as unavailable with the reason; a path given explicitly
that does not exist is an error naming its option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simvq_scale import distributed
from simvq_scale.eval.evaluator import MetricNetworks, skippable_metrics
from simvq_scale.eval.image import SSIM_CONVENTIONS
from simvq_scale.eval.runner import add_common_arguments, evaluate, finish_tool, markdown_table, start_tool, tool_loader
from simvq_scale.tools.user_errors import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--out", default="", help="report JSON path (the Markdown table goes to the same name .md)")
    parser.add_argument("--lpips-vgg", default="", help="LPIPS VGG16 trunk file (default: lpips_vgg16_features.pth "
                        "in $SIMVQ_WEIGHTS_DIR or ~/.cache/simvq_scale/weights)")
    parser.add_argument("--lpips-alex", default="", help="LPIPS AlexNet trunk file (default: lpips_alexnet_features.pth "
                        "in the weights dir)")
    parser.add_argument("--fid-inception", default="", help="TorchScript FID InceptionV3 file (default: "
                        "fid_inception.pt in the weights dir)")
    parser.add_argument("--utmos-weights", default="", help="TorchScript UTMOS model (16 kHz (B,T) -> (B,) MOS); "
                        "without it UTMOS is reported unavailable")
    parser.add_argument("--skip", default="", help=f"comma-separated metrics not to compute: {', '.join(skippable_metrics())}")
    parser.add_argument("--ssim-convention", default="paper", choices=sorted(SSIM_CONVENTIONS),
                        help="paper (default): 8-bit images, skimage's 7x7 uniform window, border windows left out, as "
                        "the SimVQ reference; torchmetrics: Gaussian 11/1.5 window over a reflect-padded border")
    args = parser.parse_args(argv)
    networks = MetricNetworks(args.lpips_vgg, args.lpips_alex, args.fid_inception, args.utmos_weights,
                              tuple(s for s in args.skip.split(",") if s), args.ssim_convention)
    tokenizer = start_tool(args.checkpoint, args.device)
    report = evaluate(tokenizer, tool_loader(tokenizer, args), networks, progress=not args.no_progress)
    if distributed.is_main():
        table = markdown_table(report)
        print(table)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            out.with_suffix(".md").write_text(table)
            print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    finish_tool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
