"""``mt2st-report DIR``: compare MT2ST runs in the style of the paper's Table V, from what the runs wrote.

Finds every ``run_summary.json`` below ``DIR`` (written by ``mt2st-train``) and each run's ``metrics.csv``
(Lightning's ``CSVLogger``), groups the runs by label (the strategy, by default) and by the settings that change
a result (data, model, strategy parameters, planned length, precision, number of processes; a label whose runs
differ there is split into one row per setting, with a message), and writes into ``DIR``:

- ``summary.md`` and ``summary.csv``: per group, mean ± std over seeds of test and best validation accuracy,
  wall time, training FLOPs, the compression rate against STL, FLOPs per batch after the switch, and the
  time and FLOPs to reach the STL runs' mean final validation accuracy; then every other test metric the
  runs logged (a setting's auxiliary metrics: held-out Spearman, a Fréchet distance, ...) and what each
  auxiliary data stream loaded (batches, samples, loading time; the runs' ``stream_costs``);
- ``curves_vs_step.png``, ``curves_vs_flops.png``: primary training loss and validation accuracy;
- ``aux_weights.png``: the auxiliary weights over time, with the steps where heads were dropped.

Run folders without a ``run_summary.json`` (killed, failed or still running) are listed as incomplete.

Definitions (the STL runs: those with the row's data, model, length, precision and processes):
    compression = 1 - FLOPs(run) / mean FLOPs(STL runs)   (negative: more compute than STL)
    target      = mean over STL runs of the final val/primary_metric
    to target   = cost/time_s_at_val and cost/flops_at_val in the first validation row with
                  val/primary_metric >= target ("not reached" if none)

The package's modules, one step each: :mod:`~mt2st_lightning.report.runs` reads the runs (each summary is a
:class:`~mt2st_lightning.app.run_format.RunSummary`), :mod:`~mt2st_lightning.report.aggregate` groups them into
rows and computes their statistics, :mod:`~mt2st_lightning.report.tables` writes the tables,
:mod:`~mt2st_lightning.report.plots` draws the figures (the only one that uses matplotlib, imported when a figure
is drawn), :mod:`~mt2st_lightning.report.build` writes the whole report and :mod:`~mt2st_lightning.report.cli` is
the command. Needs the ``[report]`` extra to draw; importing this package does not.
"""

from __future__ import annotations

from mt2st_lightning.report.aggregate import (
    Group,
    Row,
    Stat,
    Summary,
    group_runs,
    metric_name,
    metric_unit,
    strategy_order,
    summarize,
)
from mt2st_lightning.report.build import Report, incomplete_note, write_report
from mt2st_lightning.report.cli import main
from mt2st_lightning.report.plots import plot_curves, plot_weights, weights_figure
from mt2st_lightning.report.runs import IncompleteRun, Run, collect_runs, find_incomplete_runs
from mt2st_lightning.report.tables import (
    columns,
    markdown_table,
    other_metrics_table,
    stream_costs_table,
    table_notes,
    write_csv,
)

__all__ = [
    "Group",
    "IncompleteRun",
    "Report",
    "Row",
    "Run",
    "Stat",
    "Summary",
    "collect_runs",
    "columns",
    "find_incomplete_runs",
    "group_runs",
    "incomplete_note",
    "main",
    "markdown_table",
    "metric_name",
    "metric_unit",
    "other_metrics_table",
    "plot_curves",
    "plot_weights",
    "stream_costs_table",
    "strategy_order",
    "summarize",
    "table_notes",
    "weights_figure",
    "write_csv",
    "write_report",
]
