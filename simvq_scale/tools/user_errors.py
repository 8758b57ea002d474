"""The errors a user can act on, their exit codes, and how every command reports them: one line on stderr
naming the file, setting or path and what to do, instead of a traceback (README, "Exit codes")."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from simvq_scale.config import ConfigError
from simvq_scale.data import ShardPatternError
from simvq_scale.inference import ExportNotFoundError
from simvq_scale.pretrained import WeightsNotFoundError
from simvq_scale.train.run_dir import RunDirError
from simvq_scale.weights_only import FileLoadError

# the heartbeat ends a process with 7 (EXIT_RANK_LOST) itself
EXIT_CODES = [(ConfigError, 2), (ShardPatternError, 3), (WeightsNotFoundError, 4), (RunDirError, 5),
              (FileLoadError, 6), (ExportNotFoundError, 6), (FloatingPointError, 8)]


def exit_code(error: BaseException) -> int | None:
    """The exit code of a user error, None for anything else (a bug: let its traceback show)."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)


def report(error: BaseException, rank_prefix: str = "") -> None:
    print(f"error: {rank_prefix}{error}", file=sys.stderr, flush=True)


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A command's main that returns a user error's exit code after its one line (on rank 0 only: the tools'
    errors come from shared inputs, alike on every rank)."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except Exception as e:
            code = exit_code(e)
            if code is None:
                raise
            if os.environ.get("RANK", "0") == "0":
                report(e)
            return code

    return wrapped
