#!/usr/bin/env python
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
import torch.distributed as dist
from webdataset import TarWriter

from simvq_scale.eval.runner import (add_common_arguments, encoded_batches, finish_tool, rank_and_world,
                                     skipped_counts, start_tool, tool_loader)


class RankShardWriter:
    """This rank's token tars, a new one every `shard_size` samples."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.out, self.rank, self.shard_size = out, rank, shard_size
        self.paths: list[str] = []
        self.writer: TarWriter | None = None
        self.in_shard = 0
        self.samples = 0
        self.token_shape: list[int] | None = None

    def write(self, key: str, ids: np.ndarray) -> None:
        if self.writer is None or self.in_shard == self.shard_size:
            self.close()
            path = self.out / f"tokens-r{self.rank:04d}-{len(self.paths):06d}.tar"
            self.writer, self.in_shard = TarWriter(str(path)), 0
            self.paths.append(path.name)
        self.writer.write({"__key__": key, "ids.npy": ids.astype(np.int32)})
        self.in_shard += 1
        self.samples += 1
        self.token_shape = list(ids.shape)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for the token tars and tokens.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per token tar (default 10000)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be >= 1")
    tokenizer = start_tool(args.checkpoint, args.device)
    rank, world = rank_and_world()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = tool_loader(tokenizer, args)
    writer = RankShardWriter(out, rank, args.shard_size)
    try:
        for keys, _, ids in encoded_batches(tokenizer, loader, progress=not args.no_progress, desc="export"):
            for key, grid in zip(keys, ids.cpu().numpy()):
                writer.write(key, grid)
    finally:
        writer.close()
    mine = {"shards": writer.paths, "samples": writer.samples, "token_shape": writer.token_shape}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
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
