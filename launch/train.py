"""The trainer as a script path: `deepspeed ... launch/train.py` and `torchrun ... launch/train.py` take a script,
and `python launch/train.py` runs a checkout without installing. The code is simvq_scale/tools/train.py, installed
as `simvq-train` (launchers also take it as a module: `deepspeed --module simvq_scale.tools.train`, `torchrun -m`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simvq_scale.tools.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
