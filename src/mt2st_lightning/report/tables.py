"""The report's tables: the per-strategy table and its notes in Markdown, the tables of other test metrics and
of the auxiliary data streams, and ``summary.csv`` with the raw numbers."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mt2st_lightning.app.run_format import DEFAULT_PRIMARY_METRIC_NAME
from mt2st_lightning.report.aggregate import Row, Stat, Summary

__all__ = [
    "COLUMNS",
    "columns",
    "drop_cell",
    "markdown_table",
    "other_metrics_table",
    "stream_costs_table",
    "table_notes",
    "write_csv",
]


def _si(x: float) -> str:
    """1.23e9 -> '1.23 G'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:.3g}"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _seconds(x: float) -> str:
    return f"{x:.2f}"


def _cell(stat: Stat | None, fmt: Any) -> str:
    return "" if stat is None else stat.format(fmt)


def _span(steps: tuple[float, float]) -> str:
    first, last = steps
    return f"{first:g}" if first == last else f"{first:g}-{last:g}"


def drop_cell(row: Row) -> str:
    """Where the row's runs dropped their auxiliary heads: ``"never"``, or how many runs did and at which
    step, e.g. ``"3/3 at 120"`` (every run at the same step) or ``"2/3 at 149, 249"`` (each run that did, in
    seed order; ``"60-230"`` for a run whose heads left at different steps)."""
    spans = [_span(steps) for steps in row.drop_steps if steps is not None]
    if not spans:
        return "never"
    where = spans[0] if len(set(spans)) == 1 else ", ".join(spans)
    return f"{len(spans)}/{len(row.drop_steps)} at {where}"


def _to_target(stat: Stat | None, row: Row, fmt: Any) -> str:
    if row.target is None:
        return ""
    if row.reached_target == 0:
        return "not reached"
    cell = stat.format(fmt) if stat is not None else ""
    return cell if row.reached_target == row.runs else f"{cell} ({row.reached_target}/{row.runs} runs)"


COLUMNS = (
    "strategy",
    "runs",
    "test acc (%)",  # for another primary metric: "test <name> (x100)", see columns()
    "best val acc (%)",
    "wall time (s)",
    "train time (s)",
    "train FLOPs",
    "compression vs STL (%)",
    "heads dropped at step",
    "FLOPs/batch after switch",
    "time to target (s)",
    "FLOPs to target",
)


def columns(summary: Summary) -> tuple[str, ...]:
    """The table's headers, the primary metric's named for what it measures."""
    if summary.metric == DEFAULT_PRIMARY_METRIC_NAME:
        return COLUMNS
    metric = f"{summary.metric} ({summary.metric_unit})"
    return (*COLUMNS[:2], f"test {metric}", f"best val {metric}", *COLUMNS[4:])


def markdown_table(summary: Summary) -> str:
    """The per-strategy table, as Markdown."""
    headers = columns(summary)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in summary.rows:
        cells = [
            row.label,
            str(row.runs),
            _cell(row.test_acc, _percent),
            _cell(row.best_val_acc, _percent),
            _cell(row.wall_time_s, _seconds),
            _cell(row.train_time_s, _seconds),
            _cell(row.train_flops, _si),
            _cell(row.compression, _percent),
            drop_cell(row),
            _cell(row.flops_per_batch_last_phase, _si),
            _to_target(row.time_to_target_s, row, _seconds),
            _to_target(row.flops_to_target, row, _si),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_metrics_table(summary: Summary) -> str:
    """The test metrics besides the primary one, a column each (``""`` when no run logged any): a setting's
    auxiliary metrics, e.g. held-out Spearman or a Fréchet distance, for the strategies that trained them and
    for those that did not."""
    return _keyed_table(summary, "other_test_metrics")


def stream_costs_table(summary: Summary) -> str:
    """What each auxiliary data stream loaded over a run (``""`` without such streams): a dropped task's
    stream stops loading, so its batches and loading time fall with the switch."""
    return _keyed_table(summary, "stream_costs")


def _keyed_table(summary: Summary, attribute: str) -> str:
    keys = sorted({k for row in summary.rows for k in getattr(row, attribute)})
    if not keys:
        return ""
    lines = ["| strategy | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in summary.rows:
        cells = [_cell(getattr(row, attribute).get(k), "{:.4g}".format) for k in keys]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_notes(summary: Summary) -> str:
    notes = list(summary.messages)
    per_row = summary.stl_flops is None and any(row.baseline_flops is not None for row in summary.rows)
    if summary.stl_flops is None and not per_row:  # with per-row baselines, a message above says so
        notes.append(
            "No STL run here: compression is relative to nothing and left blank, and so is the target."
        )
    elif summary.stl_flops is not None:
        notes.append(
            f"Compression = 1 - FLOPs / {_si(summary.stl_flops)}FLOPs (the STL runs' mean training FLOPs)."
        )
    if summary.target is not None:
        unit = "%" if summary.metric_unit == "%" else f"({summary.metric_unit})"
        notes.append(
            f"Target = {_percent(summary.target)} {unit} val {summary.metric} (the STL runs' mean final value); "
            "time and FLOPs to target are cumulative training cost at the first validation that reaches it."
        )
    rising = [row for row in summary.rows if row.strategy == "stl" and row.rising_at_end]
    for row in rising:
        notes.append(
            f"STL may not have converged: in {row.rising_at_end} of its {row.runs} runs ({row.label}) the last "
            "validation check set a new best, so the target is below what STL would reach with more training."
        )
    notes.append(
        "Heads dropped at step: how many runs dropped their auxiliary heads, and at which optimizer step (each "
        "run that did, in seed order, unless all agree); step 0 means from the start (STL), never: kept to the end."
    )
    notes.append(
        "Train time and FLOPs count training batches (forward + backward, rank 0); wall time is the whole "
        "fit, validation and checkpointing included. FLOPs/batch after switch: the last phase's count."
    )
    return "\n".join(f"- {n}" for n in notes)


def _stat_fields(name: str, stat: Stat | None) -> dict[str, Any]:
    return {
        f"{name}_mean": "" if stat is None else stat.mean,
        f"{name}_std": "" if stat is None or stat.std is None else stat.std,
    }


def write_csv(summary: Summary, path: Path) -> None:
    """The table with raw numbers: ``<metric>_mean`` and ``<metric>_std`` columns (blank when undefined)."""
    records = []
    for row in summary.rows:
        record: dict[str, Any] = {"strategy": row.label, "mt2st_strategy": row.strategy, "runs": row.runs}
        record["seeds"] = " ".join(str(s) for s in row.seeds)
        for name in (
            "test_acc",
            "best_val_acc",
            "wall_time_s",
            "train_time_s",
            "train_flops",
            "compression",
            "flops_per_batch_last_phase",
            "time_to_target_s",
            "flops_to_target",
        ):
            record.update(_stat_fields(name, getattr(row, name)))
        for attribute in ("other_test_metrics", "stream_costs"):
            for key in sorted({k for r in summary.rows for k in getattr(r, attribute)}):
                # The key as logged ("test/aux/spearman"): its slash keeps it apart from the main columns.
                record.update(_stat_fields(key, getattr(row, attribute).get(key)))
        record["reached_target"] = row.reached_target if row.target is not None else ""
        # Per run in seed order (column "seeds"): the step its heads were dropped at, "first-last" if they
        # left at different steps, "never" if they stayed.
        record["fired_runs"] = row.fired
        record["drop_steps"] = " ".join("never" if s is None else _span(s) for s in row.drop_steps)
        record["target_val_acc"] = "" if row.target is None else row.target
        record["stl_flops"] = "" if row.baseline_flops is None else row.baseline_flops
        records.append(record)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["strategy"])
        writer.writeheader()
        writer.writerows(records)
