"""Encode a shard set into token-id shards for training a language model on the codes.

    python tools/export_tokens.py --checkpoint runs/image_65k --data 'train/imagenet-train-{000000..001023}.tar' \
        --out tokens/imagenet
    torchrun --nproc_per_node 8 tools/export_tokens.py ...    # each sample encoded by exactly one rank

Output: WebDataset tars DIR/tokens-r<rank>-<n>.tar whose samples are {"__key__": the source sample's
key, "ids.npy": int32 array of the token grid ((h, w) for images, (frames,) for audio)}, and
DIR/tokens.json (checkpoint, step, codebook size, token shape, sample count, shard list). Samples that
fail to decode are left out and counted in tokens.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds

from simvq_scale import distributed
from simvq_scale.eval.runner import (add_common_arguments, encoded_batches, finish_tool, skipped_counts, start_tool,
                                     tool_loader)
from simvq_scale.tools.user_errors import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for the token tars and tokens.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per token tar (default 10000)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be >= 1")
    tokenizer = start_tool(args.checkpoint, args.device)
    rank = distributed.rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = tool_loader(tokenizer, args)
    mine = {"shards": [], "samples": 0, "token_shape": None}
    writer = None  # opened at the first sample: a rank without samples writes no (empty) tar
    try:
        for keys, _, ids in encoded_batches(tokenizer, loader, progress=not args.no_progress, desc="export"):
            for key, grid in zip(keys, ids.cpu().numpy()):
                if writer is None:
                    writer = wds.ShardWriter(str(out / f"tokens-r{rank:04d}-%06d.tar"), maxcount=args.shard_size,
                                             post=lambda path: mine["shards"].append(Path(path).name), verbose=0)
                writer.write({"__key__": key, "ids.npy": grid.astype(np.int32)})
                mine["samples"] += 1
                mine["token_shape"] = list(grid.shape)
    finally:
        if writer is not None:
            writer.close()
    everyone = distributed.gather_objects(mine)
    skipped = skipped_counts(loader)
    if rank == 0:
        shapes = {tuple(r["token_shape"]) for r in everyone if r["token_shape"] is not None}
        manifest = {
            "checkpoint": tokenizer.source, "step": tokenizer.step, "modality": tokenizer.modality,
            "codebook_size": tokenizer.codebook_size, "dtype": "int32", "field": "ids.npy",
            "token_shape": list(shapes.pop()) if len(shapes) == 1 else sorted(map(list, shapes)),
            "samples": sum(r["samples"] for r in everyone), "skipped_samples": skipped,
            "shards": [p for r in everyone for p in r["shards"]], "data": args.data, "max_samples": args.max_samples,
        }
        (out / "tokens.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {manifest['samples']} token grids of shape {manifest['token_shape']} in "
              f"{len(manifest['shards'])} shards to {out}", file=sys.stderr)
    finish_tool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
