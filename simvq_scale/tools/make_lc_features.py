"""Frozen code features for VQGAN-LC (quantizer.kind=lc) made offline: k-means centres of the training data.

VQGAN-LC's codebook is K cluster centres of CLIP features of image patches; CLIP would need a download.
This stand-in clusters what one token covers in the input itself, so it needs no network and works for
both modalities:
  images: the f x f pixel patch of a token (f = 2^(len(model.image.channel_mult) - 1), 3 f^2 features);
  audio:  the waveform frame of a token (model.audio.hop samples).
It reads the config's training stream (shuffled, random crops), takes at most --pieces-per-sample random
pieces of each sample until it holds --pieces-per-code x K pieces, starts from K distinct random pieces,
runs --iters Lloyd iterations with the exact nearest-code search (a centre left without pieces takes a
random piece), and writes a (K, features) float32 .npy to pass as quantizer.lc_features.

    python tools/make_lc_features.py --config configs/image_65k.yaml --out lc_features_65k.npy
    python tools/make_lc_features.py --config configs/image_demo.yaml --set quantizer.codebook_size=256 --out f.npy

On a GPU K = 65,536 takes a minute or two; on a CPU expect minutes per iteration at that size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simvq_scale.config import Config, ConfigError, load_config
from simvq_scale.data import ShardPatternError, build_train_loader
from simvq_scale.quant.nearest import nearest_code

LOADER_BATCH = 16


def token_pieces(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(B, tokens, features): each token's patch of an image batch (B,3,H,W) or frame of a waveform batch (B,T)."""
    if x.dim() == 4:
        f = 2 ** (len(cfg.model.image.channel_mult) - 1)
        return torch.nn.functional.unfold(x, kernel_size=f, stride=f).transpose(1, 2)
    hop = cfg.model.audio.hop
    return x[:, : x.shape[1] // hop * hop].reshape(x.shape[0], -1, hop)


def sample_pieces(cfg: Config, count: int, per_sample: int, generator: torch.Generator) -> torch.Tensor:
    """`count` pieces (count, features), at most `per_sample` random ones from each training sample."""
    chunks, held = [], 0
    for batch in build_train_loader(cfg.data, LOADER_BATCH, 0, 1):
        pieces = token_pieces(batch["x"].float(), cfg)
        take = min(per_sample, pieces.shape[1])
        for sample in pieces:
            chunks.append(sample[torch.randperm(sample.shape[0], generator=generator)[:take]])
            held += take
        if held >= count:
            return torch.cat(chunks)[:count]
    raise RuntimeError("the training stream ended")  # it is endless; kept for the type checker


def kmeans(pieces: torch.Tensor, k: int, iters: int, generator: torch.Generator, log=print) -> torch.Tensor:
    """K centres by Lloyd's algorithm from K distinct random pieces; an emptied centre takes a random piece."""
    n = pieces.shape[0]
    centres = pieces[torch.randperm(n, generator=generator)[:k].to(pieces.device)].clone()
    for it in range(iters):
        distances, assign = nearest_code(pieces, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, pieces)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        refill = int(empty.sum())
        if refill:
            centres[empty] = pieces[torch.randint(n, (refill,), generator=generator).to(pieces.device)]
        inertia = float((distances + pieces.pow(2).sum(1)).clamp_min(0).mean())
        log(f"k-means iteration {it + 1}/{iters}: mean squared distance {inertia:.5f}, {refill} empty centres refilled")
    return centres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run config (its data, model geometry and codebook "
                        "size): a file, or a packaged config by name")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, as for launch/train.py")
    parser.add_argument("--out", required=True, help="the .npy file to write")
    parser.add_argument("--pieces-per-code", type=int, default=4, help="pieces clustered per centre (default 4)")
    parser.add_argument("--pieces-per-sample", type=int, default=16,
                        help="at most this many random pieces of one sample (default 16)")
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="", help="torch device for k-means (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if min(args.pieces_per_code, args.pieces_per_sample, args.iters) < 1:
        parser.error("--pieces-per-code, --pieces-per-sample and --iters must be >= 1")
    try:
        cfg = load_config(args.config, args.set)
        k = cfg.quantizer.codebook_size
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        pieces = sample_pieces(cfg, args.pieces_per_code * k, args.pieces_per_sample, generator)
    except (ConfigError, ShardPatternError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{pieces.shape[0]:,} pieces of {pieces.shape[1]} features from {cfg.data.train_shards} "
          f"({time.perf_counter() - start:.1f} s); clustering into K={k:,} on {device}", flush=True)
    centres = kmeans(pieces.to(device), k, args.iters, generator, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.npy")  # np.save appends .npy to other names
    np.save(partial, centres.cpu().numpy().astype(np.float32))
    partial.replace(out)  # a killed run never leaves a half-written features file under the real name
    print(f"wrote {out}: ({k:,}, {centres.shape[1]}) float32 ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
