"""What a run of ``mt2st-train`` leaves in its folder, and the metric keys a model logs for the app and the
report: the one definition that the app writes, the report reads and the example models log to.

Plain Python (no Hydra, no matplotlib), so that the report and the example models import it without the app's
extra.
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = [
    "DEFAULT_PRIMARY_METRIC_NAME",
    "METRICS_FILE",
    "RESUME_POINTER_FILE",
    "STREAM_PREFIX",
    "SUMMARY_FILE",
    "TEST_PRIMARY_METRIC",
    "TRAIN_LOSS",
    "VAL_LOSS",
    "VAL_PRIMARY_METRIC",
    "read_metrics",
    "task_loss",
]

# ---------------------------------------------------------------------------------------------- files
#: The run's summary, written by the app at the end of a run (``run_summary.json``).
SUMMARY_FILE = "run_summary.json"
#: Lightning's ``CSVLogger`` file, which the report reads the curves from.
METRICS_FILE = "metrics.csv"
#: Written by a resumed launch into its own Hydra folder: the run it continued (in that run's folder).
RESUME_POINTER_FILE = "continues_run.json"

# ---------------------------------------------------------------------------------------------- logged keys
# Logged by the example models (examples/models/), read by the app (checkpoint monitor, summary) and the report.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_PRIMARY_METRIC = "val/primary_metric"
TEST_PRIMARY_METRIC = "test/primary_metric"
#: What ``primary_metric`` measures unless the model's ``primary_metric_name`` says otherwise (e.g. the diffusion
#: model's negative denoising loss); the report names its columns and plots after it.
DEFAULT_PRIMARY_METRIC_NAME = "accuracy"
#: ``stream/<name>/{batches,samples,load_time_s,skipped}``: what an auxiliary task's own data stream loaded so
#: far in the fit (``examples.data.streams.stream_costs``, logged by the models that train on such streams).
STREAM_PREFIX = "stream/"


def task_loss(task: str, split: str = "train") -> str:
    """The key of one task's logged loss, e.g. ``train/loss/digit``."""
    return f"{split}/loss/{task}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv``, each holding only the columns it has a value in."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
