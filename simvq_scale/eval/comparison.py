"""A comparison of training runs read back from their folders: a Markdown table, a CSV and plots.

Each run folder is a trainer `out_dir` (metrics.jsonl: one JSON line per log step) with the evaluation
report of tools/eval_recon.py in eval.json. tools/compare_quantizers.py makes such folders; this module
only reads them, so a table can be rebuilt from finished runs at any time.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from simvq_scale.eval.evaluator import CODEBOOK_METRICS
from simvq_scale.modality import get_modality
from simvq_scale.train.logging import METRICS_FILE

EVAL_FILE = "eval.json"
UTILIZATION_TAG = "codebook/utilization"
PERPLEXITY_TAG = "codebook/perplexity"
W_TAGS = (("W/rank", "numerical rank of W"), ("W/effective_rank", "effective rank of W"),
          ("W/fro_norm", "Frobenius norm of W"))
# (metrics.jsonl tag, column heading, format): the trainer's figures over its usage window at the last logged
# step, which a small evaluation set cannot show (its tokens cap its utilization at tokens / K)
TRAINING_COLUMNS = ((UTILIZATION_TAG, "train utilization", ".3f"), (PERPLEXITY_TAG, "train perplexity", ".1f"))
# (eval.json metric, column heading, format) of every modality's table, before its evaluator's TABLE_COLUMNS;
# utilization and perplexity are over the evaluation set
CODEBOOK_COLUMNS = (("utilization", "utilization", ".3f"), ("perplexity", "perplexity", ".1f"))
UNAVAILABLE = "unavailable"
NO_FIGURE = "-"  # a run that was skipped or failed has no figures


class PlottingUnavailable(RuntimeError):
    """matplotlib (the `demo`/`dev` extra) is not installed."""


@dataclass
class RunRecord:
    """One row of the comparison: where the run lives and what became of it."""

    name: str
    kind: str
    codebook_size: int
    steps: int
    run_dir: Path
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    device: str = ""


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in step order. A resumed run appends the steps after its checkpoint again;
    the last line written for a step is the one that belongs to the finished course."""
    path = Path(run_dir) / METRICS_FILE
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for tag, value in by_step[step].items():
            if tag not in ("step", "time"):
                series.setdefault(tag, []).append((step, float(value)))
    return series


def last_logged(run_dir: Path) -> tuple[int, float] | None:
    """(step, wall time) of the last line of metrics.jsonl, or None when there is none."""
    path = Path(run_dir) / METRICS_FILE
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        return None
    record = json.loads(lines[-1])
    return int(record["step"]), float(record["time"])


def read_eval(run_dir: Path) -> dict | None:
    path = Path(run_dir) / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def _unavailable_reasons(reports: list[dict], metrics: tuple[str, ...]) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    for report in reports:
        for metric, reason in report.get("unavailable", {}).items():
            if metric in metrics and reason not in reasons.setdefault(metric, []):
                reasons[metric].append(reason)
    return reasons


def table_columns(modality: str) -> tuple[tuple[str, str, str], ...]:
    """(eval.json metric, heading, format) of the comparison table's figure columns for `modality`."""
    return CODEBOOK_COLUMNS + get_modality(modality).evaluator_class().TABLE_COLUMNS


def comparison_note(modality: str) -> str:
    """What a reader needs to compare a table of `modality` with other tables."""
    return get_modality(modality).evaluator_class().COMPARISON_NOTE


def markdown_table(records: list[RunRecord], modality: str, caption: str) -> str:
    """The caption, one row per run (the trainer's last usage figures, then the figures of its eval.json), the
    ceiling a small evaluation set puts on utilization, and the reasons of unavailable metrics."""
    columns = table_columns(modality)
    headings = [h for _, h, _ in TRAINING_COLUMNS + columns]
    lines = [caption, "", "| run | quantizer | K | steps | " + " | ".join(headings) + " | note |",
             "|---|---|---|---|" + "---|" * len(headings) + "---|"]
    reports = []
    for record in records:
        report = read_eval(record.run_dir) if record.status == "ok" else None
        series = read_metrics(record.run_dir) if record.status == "ok" else {}
        cells = [_cell(series[tag][-1][1], fmt) if tag in series else NO_FIGURE for tag, _, fmt in TRAINING_COLUMNS]
        if report is None:
            cells += [NO_FIGURE] * len(columns)
        else:
            reports.append(report)
            cells += [_cell(report["metrics"][m], fmt) if m in report["metrics"] else UNAVAILABLE
                      for m, _, fmt in columns]
        note = record.note if record.status == "ok" else f"{record.status}: {record.note}"
        lines.append(f"| {record.name} | {record.kind} | {record.codebook_size:,} | {record.steps:,} | "
                     + " | ".join(cells) + f" | {note} |")
    ceilings = sorted({(r["tokens"], r["codebook_size"]) for r in reports
                       if "tokens" in r and r["tokens"] < r["codebook_size"]})
    reasons = _unavailable_reasons(reports, tuple(m for m, _, _ in columns))
    if ceilings or reasons:
        lines.append("")
    lines += [f"utilization over the evaluation set cannot exceed {tokens / k:.3f} at K = {k:,}: its {tokens:,} "
              "tokens are fewer than the codes (the train columns count the trainer's usage window)"
              for tokens, k in ceilings]
    eval_headings = {m: h for m, h, _ in columns}
    lines += [f"{eval_headings[m]} {UNAVAILABLE}: {'; '.join(r)}" for m, r in reasons.items()]
    return "\n".join(lines) + "\n"


def csv_rows(records: list[RunRecord], modality: str) -> list[dict[str, object]]:
    """Every evaluation figure of each run (empty when unavailable) and the last logged training figures."""
    recon_tag = get_modality(modality).recon_loss_tag
    metrics = (*CODEBOOK_METRICS, *get_modality(modality).evaluator_class().METRICS)
    rows = []
    for record in records:
        report = read_eval(record.run_dir) if record.status == "ok" else None
        series = read_metrics(record.run_dir)
        row: dict[str, object] = {"run": record.name, "quantizer": record.kind, "codebook_size": record.codebook_size,
                                  "steps": record.steps, "status": record.status, "note": record.note,
                                  "device": record.device, "eval_samples": report["samples"] if report else ""}
        for metric in metrics:
            row[metric] = report["metrics"].get(metric, "") if report else ""
        for column, tag in (("train_utilization", UTILIZATION_TAG), ("train_perplexity", PERPLEXITY_TAG),
                            (f"train_{recon_tag.split('/')[1]}", recon_tag)):
            row[column] = series[tag][-1][1] if tag in series else ""
        rows.append(row)
    return rows


def write_csv(records: list[RunRecord], modality: str, path: Path) -> None:
    rows = csv_rows(records, modality)
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; a clear error when the package is missing."""
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable("the plots need matplotlib (pip install -e '.[demo]', or pip install matplotlib); "
                                  "or leave them out with --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_series(runs: dict[str, dict], panels: tuple[tuple[str, str], ...], title: str, path: Path) -> bool:
    """One figure with a panel per (tag, label), a line per run that logged the tag; False when none did."""
    if not any(tag in series for series in runs.values() for tag, _ in panels):
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, (tag, label) in zip(axes[0], panels):
        for name, series in runs.items():
            if tag in series:
                steps, values = zip(*series[tag])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(records: list[RunRecord], modality: str, out: Path) -> list[Path]:
    """utilization.png, recon_loss.png and w_rank_norm.png (only for runs that log W); the paths written."""
    runs = {r.name: read_metrics(r.run_dir) for r in records if r.status != "skipped"}
    recon_tag = get_modality(modality).recon_loss_tag
    figures = (
        ("utilization.png", ((UTILIZATION_TAG, "codebook utilization (training window)"),),
         "Codebook utilization during training"),
        ("recon_loss.png", ((recon_tag, recon_tag),), "Reconstruction loss during training"),
        ("w_rank_norm.png", W_TAGS, "The projection W during training (the paper's Fig. 4)"),
    )
    written = []
    for file, panels, title in figures:
        if _plot_series(runs, panels, title, Path(out) / file):
            written.append(Path(out) / file)
    return written
