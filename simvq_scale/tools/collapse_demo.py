"""Representation collapse in one minute on a CPU: train only a quantizer to fit fixed Gaussian-mixture features.

No encoder or decoder: the features x are fixed points drawn once from a Gaussian
mixture, and Adam trains only the quantizer's parameters to fit them, minimising
the quantizer's own loss (its commitment/codebook terms) plus |z_q - x|^2. The
second term reaches only the projections of FC, FSQ and LFQ (for VQ and SimVQ its
straight-through gradient lands on the fixed x), so that FSQ, which has no loss
of its own, learns as it would inside an autoencoder.
Utilization at the end is the fraction of codes chosen at least once when all
features are assigned. Vanilla VQ moves only the codes that are already nearest
to some feature, so most codes never move and die; SimVQ moves all codes through
the one linear layer W (the paper's Sec. 4.2 / Fig. 2).

    python tools/collapse_demo.py --quantizer simvq --codebook-size 16384 --dim 32 --steps 300
    python tools/collapse_demo.py --quantizer vq    --codebook-size 16384 --dim 32 --steps 300 --plot vq.png

Progress lines go to stdout while it runs; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant import build_quantizer
from simvq_scale.quant.stats import CodebookUsage

DEMO_KINDS = ("simvq", "vq", "vq_ema", "fc", "fsq", "lfq")
ASSIGN_CHUNK = 65536  # features assigned per forward when measuring the final utilization
# with 4 features per code the nearest-neighbour ceiling of any codebook is ~0.95 (measured); 8 leave room
FEATURES_PER_CODE = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizer", choices=DEMO_KINDS, default="simvq", help="quantizer kind to train")
    p.add_argument("--codebook-size", type=int, default=16384, help="K, number of codes")
    p.add_argument("--dim", type=int, default=32, help="feature / code dimension")
    p.add_argument("--steps", type=int, default=300, help="Adam steps")
    p.add_argument("--batch", type=int, default=4096, help="features per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the features, the codebook and the batches")
    p.add_argument("--features", type=int, default=0,
                   help="number of distinct fixed features (default 8 x codebook size: must exceed K "
                        "for full utilization to be possible)")
    p.add_argument("--components", type=int, default=8, help="Gaussian mixture components")
    p.add_argument("--intrinsic-dim", type=int, default=4,
                   help="dimension of the random subspace the features lie in (<= --dim)")
    p.add_argument("--fsq-levels", type=str, default="",
                   help="comma-separated FSQ levels (default: 8s and one smaller level, product = K, K a power of 2)")
    p.add_argument("--log-every", type=int, default=25, help="steps between progress lines")
    p.add_argument("--plot", type=str, default="",
                   help="write utilization over steps and a 2-D PCA view of codes vs features to this .png")
    return p.parse_args(argv)


def default_fsq_levels(codebook_size: int) -> list[int]:
    bits = int(round(math.log2(codebook_size)))
    if codebook_size < 2 or 2**bits != codebook_size:
        raise SystemExit(f"--codebook-size {codebook_size} is not a power of 2: give FSQ levels with --fsq-levels")
    levels = [8] * (bits // 3)
    return levels + ([2 ** (bits % 3)] if bits % 3 else [])


def gaussian_mixture(n: int, dim: int, components: int, intrinsic_dim: int, generator: torch.Generator) -> torch.Tensor:
    """n points of a Gaussian mixture on a random `intrinsic_dim`-dimensional subspace, of norm ~ 1.

    Like encoder features, they fill a low-dimensional set: in the subspace, component means ~ N(0, 0.5^2)
    and unit spread (overlapping components), then scaled to the frozen codebook's norm. Why low-dimensional:
    codes and features in all 32 dimensions sit in the nearest-neighbour "hubness" regime, where even a
    codebook drawn from the features' own distribution leaves about a quarter of its codes nobody's nearest.
    """
    basis = torch.linalg.qr(torch.randn(dim, intrinsic_dim, generator=generator))[0]
    means = 0.5 * torch.randn(components, intrinsic_dim, generator=generator)
    which = torch.randint(components, (n,), generator=generator)
    low = means[which] + torch.randn(n, intrinsic_dim, generator=generator)
    return low @ basis.T * intrinsic_dim**-0.5


@torch.no_grad()
def assign_all(quantizer, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([quantizer(chunk).indices for chunk in features.split(ASSIGN_CHUNK)])


def plot(path: str, curve: list[tuple[int, float]], quantizer, features: torch.Tensor, title: str) -> None:
    import matplotlib  # only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        codes = quantizer.decode_indices(torch.arange(quantizer.codebook_size)).float()
    shown = features[torch.randperm(features.shape[0])[:20000]]
    mean = shown.mean(0)
    basis = torch.pca_lowrank(shown - mean, q=2, center=False)[2]  # the features' two principal axes
    f2, c2 = (shown - mean) @ basis, (codes - mean) @ basis
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    a.plot([s for s, _ in curve], [u for _, u in curve])
    a.set(xlabel="step", ylabel="utilization (training window)", ylim=(0, 1.02), title=title)
    b.scatter(f2[:, 0], f2[:, 1], s=1, alpha=0.3, label="features")
    b.scatter(c2[:, 0], c2[:, 1], s=1, alpha=0.5, c="red", label="codes")
    b.set(title="PCA of features and codes")
    b.legend(markerscale=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    k = args.codebook_size
    n_features = args.features or FEATURES_PER_CODE * k
    if not 1 <= args.intrinsic_dim <= args.dim:
        raise SystemExit(f"--intrinsic-dim {args.intrinsic_dim} must be in [1, --dim {args.dim}]")
    features = gaussian_mixture(n_features, args.dim, args.components, args.intrinsic_dim, generator)
    cfg = QuantizerConfig(kind=args.quantizer, codebook_size=k, dim=args.dim, seed=args.seed, search_impl="torch")
    if args.quantizer == "fsq":
        cfg.fsq.levels = [int(v) for v in args.fsq_levels.split(",")] if args.fsq_levels else default_fsq_levels(k)
    quantizer = build_quantizer(cfg)
    params = [p for p in quantizer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr) if params else None
    usage = CodebookUsage(k, window_tokens=n_features)  # training-time usage over the last pass of features
    curve: list[tuple[int, float]] = []
    print(f"collapse demo: {args.quantizer} K={k} dim={args.dim} features={n_features} steps={args.steps} "
          f"batch={args.batch} lr={args.lr} intrinsic_dim={args.intrinsic_dim}", flush=True)
    for step in range(1, args.steps + 1):
        batch = features[torch.randint(n_features, (args.batch,), generator=generator)]
        out = quantizer(batch)
        loss = out.loss + (out.z_q - batch).pow(2).mean()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        usage.update(out.indices)
        if step % args.log_every == 0 or step == args.steps:
            utilization = usage.reduce()["utilization"]
            curve.append((step, utilization))
            print(f"step {step:5d}  loss {loss.item():.4f}  utilization(window) {utilization:.4f}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    quantizer.eval()
    final = CodebookUsage(k, window_tokens=n_features)
    final.update(assign_all(quantizer, features))
    figures = final.reduce()
    with torch.no_grad():
        mse = sum(float((quantizer(c).z_q - c).pow(2).sum()) for c in features.split(ASSIGN_CHUNK))
    if args.plot:
        plot(args.plot, curve, quantizer, features, f"{args.quantizer}, K={k}")
    result = {
        "quantizer": args.quantizer, "codebook_size": k, "dim": args.dim, "steps": args.steps,
        "features": n_features, "intrinsic_dim": args.intrinsic_dim, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "utilization": figures["utilization"], "perplexity": figures["perplexity"],
        "dead_codes": int(figures["dead_codes"]), "top1pct_share": figures["top1pct_share"],
        "feature_mse": mse / features.numel(), "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
