"""Train a SimVQ tokenizer: the one entry point, installed as `simvq-train`.

    simvq-train --config image_demo                                     # one process; a packaged config by name
    python launch/train.py --config configs/image_demo.yaml             # the same from a checkout
    torchrun --nproc-per-node 8 launch/train.py --config configs/image_65k.yaml
    deepspeed --hostfile hosts launch/train.py --config configs/audio_262k.yaml
    deepspeed --num_gpus 8 --module simvq_scale.tools.train --config image_65k   # a launcher without a checkout
    simvq-train --config FILE --set quantizer.codebook_size=262144 optim.lr=2e-4 --resume auto
    simvq-train --config FILE --dry-run                                 # validate, build, print one JSON line

Exit codes (a user error is one line on stderr, naming the file, setting or path and what to do):
    0 done   1 unexpected error (with its traceback)   2 config   3 data   4 pretrained weights
    5 run folder or --resume/--overwrite   6 a checkpoint or export refused or unreadable
    7 another rank was lost or stopped (heartbeat)   8 non-finite losses under train.nan_policy=stop
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from simvq_scale import distributed
from simvq_scale.config import CONFIG_HELP, ConfigError, load_config
from simvq_scale.tools.user_errors import exit_code, report
from simvq_scale.train.heartbeat import Heartbeat
from simvq_scale.train.preflight import check_inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. train.steps=100")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint of train.out_dir, if any) or a run/checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a train.out_dir that holds a run: deletes its checkpoints, logs and "
                             "export (nothing else)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, check data, weights and output folder, build, print one JSON line, exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heartbeat = None
    try:
        cfg = load_config(args.config, args.set)
        device = distributed.init_distributed(timeout_s=cfg.train.collective_timeout_s)
        try:
            cfg.validate(distributed.world_size())
        except ConfigError as e:
            e.same_on_every_rank = True
            raise
        check_inputs(cfg)
        if not args.dry_run:
            heartbeat = Heartbeat.start(cfg.train.heartbeat_timeout_s, cfg.train.collective_timeout_s)
        from simvq_scale.train.trainer import Trainer

        trainer = Trainer(cfg, device, resume=args.resume, overwrite=args.overwrite, open_run_dir=not args.dry_run)
        if args.dry_run:
            if distributed.is_main():
                print(json.dumps(trainer.describe()), flush=True)
            return 0
        if heartbeat is not None:
            heartbeat.step_source = lambda: trainer.state.step
        trainer.fit()
    except Exception as e:
        # RunDir.open raises alike on every rank; train.nan_policy=stop decides on a count reduced over all
        same_on_every_rank = getattr(e, "same_on_every_rank", isinstance(e, FloatingPointError))
        if heartbeat is not None and not same_on_every_rank:
            heartbeat.fail(f"{type(e).__name__}: {e}")  # the others stop now, not after the collective timeout
        code = exit_code(e)
        if code is None:
            raise
        if os.environ.get("RANK", "0") == "0" or not same_on_every_rank:
            report(e, f"rank {os.environ['RANK']}: " if distributed.world_size() > 1 and not same_on_every_rank else "")
        return code
    if heartbeat is not None:
        heartbeat.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
