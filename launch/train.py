"""Train a SimVQ tokenizer: the one entry point.

    python launch/train.py --config configs/image_demo.yaml            # one process, no launcher
    torchrun --nproc-per-node 8 launch/train.py --config configs/image_65k.yaml
    deepspeed --hostfile hosts launch/train.py --config configs/audio_262k.yaml
    python launch/train.py --config FILE --set quantizer.codebook_size=262144 optim.lr=2e-4 --resume auto
    python launch/train.py --config FILE --dry-run                      # validate, build, print one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simvq_scale import distributed  # noqa: E402
from simvq_scale.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. train.steps=100")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint of train.out_dir, if any) or a run/checkpoint folder")
    parser.add_argument("--dry-run", action="store_true", help="validate and build, print one JSON line, exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = distributed.init_distributed()
    try:
        cfg.validate(distributed.world_size())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from simvq_scale.train.trainer import Trainer

    trainer = Trainer(cfg, device, resume=args.resume)
    if args.dry_run:
        if distributed.is_main():
            print(json.dumps(trainer.describe()), flush=True)
        return 0
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
