"""Reading runs: each finished run's ``run_summary.json`` (:class:`~mt2st_lightning.app.run_format.RunSummary`)
and ``metrics.csv``, and the run folders that have no summary (killed, failed or still running)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt2st_lightning.app.run_format import (
    RESUME_POINTER_FILE,
    STREAM_PREFIX,
    SUMMARY_FILE,
    TEST_PRIMARY_METRIC,
    RunSummary,
    first_reach,
    read_metrics,
    validation_rows,
)
from mt2st_lightning.app.run_format import VAL_PRIMARY_METRIC as VAL_METRIC

__all__ = ["IncompleteRun", "Run", "collect_runs", "find_incomplete_runs", "relative_link"]

# Test metrics of the main table, or logged by every run: the others get a table of their own.
_TEST_KEYS_IN_MAIN_TABLE = frozenset({TEST_PRIMARY_METRIC, "test/loss", "test/samples"})


@dataclass
class Run:
    """One training run: its ``run_summary.json`` and the rows of its ``metrics.csv``."""

    dir: Path
    summary: RunSummary
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.summary.label

    @property
    def strategy(self) -> str:
        return self.summary.strategy

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the result besides label and seed (empty in a version-0 summary, written before it existed)."""
        return self.summary.settings

    @property
    def metric_name(self) -> str:
        """What ``primary_metric`` measures (the model's ``primary_metric_name``)."""
        return self.summary.primary_metric_name

    @property
    def val_rows(self) -> list[dict[str, float]]:
        return validation_rows(self.metrics)

    @property
    def final_val(self) -> float | None:
        rows = self.val_rows
        return rows[-1][VAL_METRIC] if rows else self.summary.final_val_primary_metric

    @property
    def best_val(self) -> float | None:
        """The checkpoint monitor's best value; without one monitoring it, the best logged validation."""
        best = self.summary.best_val_primary_metric
        if best is None and self.val_rows:
            best = max(r[VAL_METRIC] for r in self.val_rows)
        return best

    @property
    def flops_per_batch_last_phase(self) -> float | None:
        phases = list(self.summary.phases.values())
        return phases[-1]["flops_per_batch"] if phases else None

    @property
    def rising_at_end(self) -> bool:
        """Whether the last validation check set a new best: the run may not have converged."""
        values = [r[VAL_METRIC] for r in self.val_rows]
        return len(values) > 1 and values[-1] > max(values[:-1])

    @property
    def other_test_metrics(self) -> dict[str, float]:
        """The test metrics besides the primary one (and the loss and sample count that every run logs)."""
        logged = self.summary.test_metrics
        return {k: float(v) for k, v in logged.items() if k not in _TEST_KEYS_IN_MAIN_TABLE}

    @property
    def stream_costs(self) -> dict[str, float]:
        """``stream/<name>/<cost>`` of each auxiliary data stream over the fit (empty without such streams);
        for a summary of a version that did not record them, the last values in ``metrics.csv``."""
        if self.summary.stream_costs is not None:
            return {k: float(v) for k, v in self.summary.stream_costs.items()}
        return {k: v for row in self.metrics for k, v in row.items() if k.startswith(STREAM_PREFIX)}

    def first_reach(self, target: float) -> dict[str, float] | None:
        """The first validation row whose primary metric reaches ``target``; ``None`` if none does."""
        return first_reach(self.metrics, target)

    def drop_steps(self) -> dict[str, float]:
        """Task -> optimizer step at which its head was dropped (epochs mapped to that epoch's first step)."""
        drops = self.summary.drop_times
        if self.summary.mt2st_unit == "step":
            return {task: float(t) for task, t in drops.items()}
        steps = {}
        for task, epoch in drops.items():
            row = next((r for r in self.metrics if r.get("epoch", -1) >= epoch and "step" in r), None)
            if row is not None:
                steps[task] = row["step"]
        return steps


@dataclass
class IncompleteRun:
    """A run folder without a ``run_summary.json``: killed, failed, or still running."""

    dir: Path
    last_step: int | None  # the last step in its metrics.csv
    has_last_checkpoint: bool

    def describe(self, base: Path) -> str:
        where = relative_link(self.dir, base)
        step = "no metrics logged" if self.last_step is None else f"last logged step {self.last_step}"
        resume = (
            f"; resume with ckpt_path={self.dir / 'checkpoints' / 'last.ckpt'}" if self.has_last_checkpoint else "; no checkpoint"
        )
        return f"{where}: {step}{resume}"


def collect_runs(root: str | Path) -> list[Run]:
    """Every finished run below ``root`` (or ``root`` itself), in path order. A summary this version cannot read
    (a newer format, or not one at all) is a :class:`~mt2st_lightning.app.run_format.RunSummaryError` naming it."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    runs = []
    for summary_path in sorted(root.rglob(SUMMARY_FILE)):
        summary = RunSummary.read(summary_path)
        csv_path = summary.metrics_csv
        metrics_path = summary_path.parent / csv_path if csv_path else None  # absolute paths survive the join
        metrics = read_metrics(metrics_path) if metrics_path is not None and metrics_path.is_file() else []
        runs.append(Run(summary_path.parent, summary, metrics))
    return runs


def find_incomplete_runs(root: str | Path) -> list[IncompleteRun]:
    """Run folders below ``root`` (a Hydra ``.hydra/`` folder, ``checkpoints/`` or ``csv/metrics.csv``) without a
    ``run_summary.json``. A folder that only launched a resume (``continues_run.json``) is part of the run it
    continued, not a run of its own."""
    root = Path(root)
    candidates = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    candidates |= {p.parent for p in root.rglob("checkpoints") if p.is_dir()}
    candidates |= {p.parent.parent for p in root.rglob("metrics.csv") if p.parent.name == "csv"}
    incomplete = []
    for run in sorted(candidates):
        if (run / SUMMARY_FILE).is_file() or (run / RESUME_POINTER_FILE).is_file():
            continue
        metrics = run / "csv" / "metrics.csv"
        rows = read_metrics(metrics) if metrics.is_file() else []
        steps = [int(r["step"]) for r in rows if "step" in r]
        incomplete.append(IncompleteRun(run, max(steps) if steps else None, (run / "checkpoints" / "last.ckpt").is_file()))
    return incomplete


def relative_link(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it is inside it (as the report's Markdown links it), else as it is."""
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
