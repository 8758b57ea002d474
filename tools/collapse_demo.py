"""`simvq-collapse-demo` run from a checkout without installing: the same main as the installed command
(simvq_scale/tools/collapse_demo.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simvq_scale.tools.collapse_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
