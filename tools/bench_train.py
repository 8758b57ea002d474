"""`simvq-bench-train` run from a checkout without installing: the same main as the installed command
(simvq_scale/tools/bench_train.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simvq_scale.tools.bench_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
