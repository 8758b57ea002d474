"""The commands: one module per command, each with `main(argv=None) -> int` (its exit status).

Installed as console scripts (setup.cfg, [options.entry_points]: `simvq-train`, `simvq-eval`, ...), run as
`python -m simvq_scale.tools.NAME`, and from a checkout as `python tools/NAME.py` / `python launch/train.py`
(thin scripts that call the same `main`). search_check.py is not a command: the search benchmark's and the
tests' yardsticks.
"""
