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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt2st_lightning.app.run_format import (
    DEFAULT_PRIMARY_METRIC_NAME,
    RESUME_POINTER_FILE,
    STREAM_PREFIX,
    SUMMARY_FILE,
    TEST_PRIMARY_METRIC,
    read_metrics,
    task_loss,
)
from mt2st_lightning.app.run_format import VAL_PRIMARY_METRIC as VAL_METRIC
from mt2st_lightning.extras import require
from mt2st_lightning.names import COST_FLOPS, WEIGHT_PREFIX
from mt2st_lightning.names import COST_FLOPS_AT_VAL as FLOPS_AT_VAL
from mt2st_lightning.names import COST_TIME_AT_VAL as TIME_AT_VAL

__all__ = [
    "RESUME_POINTER_FILE",
    "SUMMARY_FILE",
    "IncompleteRun",
    "Report",
    "Row",
    "Run",
    "Stat",
    "collect_runs",
    "find_incomplete_runs",
    "main",
    "markdown_table",
    "other_metrics_table",
    "stream_costs_table",
    "plot_curves",
    "plot_weights",
    "read_metrics",
    "summarize",
    "weights_figure",
    "write_report",
]

# Test metrics of the main table, or logged by every run: the others get a table of their own.
_TEST_KEYS_IN_MAIN_TABLE = frozenset({TEST_PRIMARY_METRIC, "test/loss", "test/samples"})
# Table order for the built-in strategies; other labels follow alphabetically.
STRATEGY_ORDER = ("stl", "mtl", "diminish", "switch", "gradnorm", "fisher", "noise")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Run:
    """One training run: its ``run_summary.json`` and the rows of its ``metrics.csv``."""

    dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.summary.get("label") or self.summary["strategy"])

    @property
    def strategy(self) -> str:
        return str(self.summary["strategy"])

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the result besides label and seed (empty for summaries written before it existed)."""
        return self.summary.get("settings") or {}

    @property
    def metric_name(self) -> str:
        """What ``primary_metric`` measures (the model's ``primary_metric_name``; accuracy for older runs)."""
        return str(self.summary.get("primary_metric_name") or DEFAULT_PRIMARY_METRIC_NAME)

    @property
    def val_rows(self) -> list[dict[str, float]]:
        return [r for r in self.metrics if VAL_METRIC in r]

    @property
    def final_val(self) -> float | None:
        rows = self.val_rows
        return rows[-1][VAL_METRIC] if rows else self.summary.get("final_val_primary_metric")

    @property
    def best_val(self) -> float | None:
        best = self.summary.get("best_val_primary_metric")
        if best is None and self.val_rows:
            best = max(r[VAL_METRIC] for r in self.val_rows)
        return best

    @property
    def flops_per_batch_last_phase(self) -> int | None:
        phases = list((self.summary.get("phases") or {}).values())
        return phases[-1]["flops_per_batch"] if phases else None

    @property
    def rising_at_end(self) -> bool:
        """Whether the last validation check set a new best: the run may not have converged."""
        values = [r[VAL_METRIC] for r in self.val_rows]
        return len(values) > 1 and values[-1] > max(values[:-1])

    @property
    def other_test_metrics(self) -> dict[str, float]:
        """The test metrics besides the primary one (and the loss and sample count that every run logs)."""
        logged = self.summary.get("test_metrics") or {}
        return {k: float(v) for k, v in logged.items() if k not in _TEST_KEYS_IN_MAIN_TABLE}

    @property
    def stream_costs(self) -> dict[str, float]:
        """``stream/<name>/<cost>`` of each auxiliary data stream over the fit (empty without such streams);
        for a summary written before it held them, the last values in ``metrics.csv``."""
        if "stream_costs" in self.summary:
            return {k: float(v) for k, v in (self.summary["stream_costs"] or {}).items()}
        return {k: v for row in self.metrics for k, v in row.items() if k.startswith(STREAM_PREFIX)}

    def first_reach(self, target: float) -> dict[str, float] | None:
        """The first validation row whose primary metric reaches ``target``; ``None`` if none does."""
        return next((r for r in self.val_rows if r[VAL_METRIC] >= target), None)

    def drop_steps(self) -> dict[str, float]:
        """Task -> optimizer step at which its head was dropped (epochs mapped to that epoch's first step)."""
        drops = self.summary.get("drop_times") or {}
        if self.summary.get("mt2st_unit", "step") == "step":
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
        where = _link(self.dir, base)
        step = "no metrics logged" if self.last_step is None else f"last logged step {self.last_step}"
        resume = (
            f"; resume with ckpt_path={self.dir / 'checkpoints' / 'last.ckpt'}" if self.has_last_checkpoint else "; no checkpoint"
        )
        return f"{where}: {step}{resume}"


def collect_runs(root: str | Path) -> list[Run]:
    """Every finished run below ``root`` (or ``root`` itself), in path order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    runs = []
    for summary_path in sorted(root.rglob(SUMMARY_FILE)):
        summary = json.loads(summary_path.read_text())
        csv_path = summary.get("metrics_csv")
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


# ---------------------------------------------------------------------------------------------- grouping
def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        out: dict[str, Any] = {}
        for key, value in settings.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(settings, sort_keys=True)}


def _settings_key(settings: dict[str, Any], without: tuple[str, ...] = ()) -> str:
    return json.dumps({k: v for k, v in settings.items() if k not in without}, sort_keys=True)


def _short(value: str) -> str:
    """``"mt2st_lightning.examples.models.ConvEncoder"`` -> ``ConvEncoder``; other values as they are."""
    text = value.strip('"')
    return text.rsplit(".", 1)[-1] if text.count(".") >= 2 and " " not in text else text


@dataclass
class Group:
    """Runs that share a label and every setting: what one table row averages."""

    label: str  # the row's name: the runs' label, plus the settings that tell it apart from its namesakes
    runs: list[Run]


def group_runs(runs: Iterable[Run], messages: list[str] | None = None) -> list[Group]:
    """Runs by label and settings, the built-in strategies first in their usual order. A label whose runs
    differ in their settings becomes one row per setting, named by what differs (a message says so)."""
    by_label: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_label.setdefault(run.label, {}).setdefault(_settings_key(run.settings), []).append(run)

    def order(label: str) -> tuple[int, str]:
        return (STRATEGY_ORDER.index(label) if label in STRATEGY_ORDER else len(STRATEGY_ORDER), label)

    groups = []
    for label in sorted(by_label, key=order):
        variants = list(by_label[label].values())
        if len(variants) == 1:
            groups.append(Group(label, variants[0]))
            continue
        flat = [_flatten(v[0].settings) for v in variants]
        differ = sorted({k for f in flat for k in f if len({g.get(k) for g in flat}) > 1})
        if messages is not None:
            messages.append(
                f"Runs labelled {label!r} differ in {', '.join(differ)}: not averaged together, split into "
                f"{len(variants)} rows."
            )
        for runs_, f in zip(variants, flat, strict=True):
            suffix = ", ".join(f"{k}={_short(f[k]) if k in f else '?'}" for k in differ)
            groups.append(Group(f"{label} ({suffix})", runs_))
    return groups


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation over ``n`` runs (no std for a single run)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return None
        # fmean sums exactly (math.fsum): the same runs give the same mean in any order.
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def format(self, fmt: Any = "{:.3g}".format) -> str:
        return fmt(self.mean) if self.std is None else f"{fmt(self.mean)} ± {fmt(self.std)}"


@dataclass
class Row:
    """One table row: the runs of one label, summarised over seeds."""

    label: str
    strategy: str
    runs: int
    seeds: list[int]
    test_acc: Stat | None
    best_val_acc: Stat | None
    wall_time_s: Stat | None
    train_time_s: Stat | None
    train_flops: Stat | None
    compression: Stat | None
    flops_per_batch_last_phase: Stat | None
    time_to_target_s: Stat | None
    flops_to_target: Stat | None
    reached_target: int
    target: float | None = None  # the val accuracy this row's time/FLOPs to target refer to
    baseline_flops: float | None = None  # the STL FLOPs this row's compression refers to
    other_test_metrics: dict[str, Stat] = field(default_factory=dict)  # e.g. a held-out auxiliary metric
    stream_costs: dict[str, Stat] = field(default_factory=dict)  # what the auxiliary data streams loaded
    rising_at_end: int = 0  # runs whose last validation check set their best value


@dataclass
class Summary:
    """The table's rows and what they are measured against (``None`` without STL runs, or when rows of
    different settings have different STL baselines: then each row holds its own)."""

    rows: list[Row]
    target: float | None  # the STL runs' mean final validation accuracy
    stl_flops: float | None  # the STL runs' mean training FLOPs: the compression baseline
    messages: list[str] = field(default_factory=list)  # how unlike runs were kept apart
    metric: str = DEFAULT_PRIMARY_METRIC_NAME  # what the runs' primary metric measures ("primary metric" if they disagree)

    @property
    def metric_unit(self) -> str:
        return metric_unit(self.metric)


# Runs of another strategy compare against the STL runs that share these settings, not their strategy's.
_BASELINE_FREE = ("strategy",)


def summarize(runs: Sequence[Run]) -> Summary:
    """One row per label and setting. Compression and the target come from the runs with strategy ``stl`` that
    share the row's data, model, planned length, precision and number of processes."""
    baselines: dict[str, tuple[float | None, float | None]] = {}
    for key in {_settings_key(r.settings, _BASELINE_FREE) for r in runs}:
        stl = [r for r in runs if r.strategy == "stl" and _settings_key(r.settings, _BASELINE_FREE) == key]
        stl_flops = Stat.of(r.summary.get("train_flops") for r in stl)
        stl_final = Stat.of(r.final_val for r in stl)
        baselines[key] = (
            stl_final.mean if stl_final is not None else None,
            stl_flops.mean if stl_flops is not None and stl_flops.mean > 0 else None,
        )

    messages: list[str] = []
    rows = []
    for group in group_runs(runs, messages):
        runs_ = group.runs
        target, baseline = baselines[_settings_key(runs_[0].settings, _BASELINE_FREE)]
        flops = Stat.of(r.summary.get("train_flops") for r in runs_)
        reached = [hit for r in runs_ if target is not None and (hit := r.first_reach(target)) is not None]
        rows.append(
            Row(
                label=group.label,
                strategy=runs_[0].strategy,
                runs=len(runs_),
                seeds=sorted(r.summary.get("seed") for r in runs_),
                test_acc=Stat.of(r.summary.get("test_primary_metric") for r in runs_),
                best_val_acc=Stat.of(r.best_val for r in runs_),
                wall_time_s=Stat.of(r.summary.get("fit_wall_time_s") for r in runs_),
                train_time_s=Stat.of(r.summary.get("train_time_s") for r in runs_),
                train_flops=flops,
                compression=_compression(flops, baseline),
                flops_per_batch_last_phase=Stat.of(r.flops_per_batch_last_phase for r in runs_),
                time_to_target_s=Stat.of(hit.get(TIME_AT_VAL) for hit in reached),
                flops_to_target=Stat.of(hit.get(FLOPS_AT_VAL) for hit in reached),
                reached_target=len(reached),
                target=target,
                baseline_flops=baseline,
                other_test_metrics=_stats_by_key([r.other_test_metrics for r in runs_]),
                stream_costs=_stats_by_key([r.stream_costs for r in runs_]),
                rising_at_end=sum(r.rising_at_end for r in runs_),
            )
        )
    used = {(row.target, row.baseline_flops) for row in rows}
    target, stl_flops = used.pop() if len(used) == 1 else (None, None)
    if len(used) > 0:
        messages.append(
            "Rows of different settings have different STL runs to compare with: each row's compression and "
            "target are against the STL runs of its own settings (summary.csv: target_val_acc, stl_flops)."
        )
    return Summary(rows, target, stl_flops, messages, metric_name(runs))


def metric_unit(metric: str) -> str:
    """How a primary metric is shown: an accuracy in %, anything else x 100 (the table prints every one x 100)."""
    return "%" if metric == DEFAULT_PRIMARY_METRIC_NAME else "x100"


def metric_name(runs: Iterable[Run]) -> str:
    """The primary metric's name shared by ``runs``; ``"primary metric"`` when they name different ones."""
    names = {run.metric_name for run in runs}
    return names.pop() if len(names) == 1 else "primary metric"


def _stats_by_key(values: Sequence[Mapping[str, float]]) -> dict[str, Stat]:
    """Mean ± std per key over the runs that have a finite value for it (a NaN, e.g. an accuracy over no
    samples, is left out rather than spread over the row)."""
    keys = sorted({k for v in values for k in v})
    stats = {k: Stat.of(x if x is not None and math.isfinite(x) else None for x in (v.get(k) for v in values)) for k in keys}
    return {k: stat for k, stat in stats.items() if stat is not None}


def _compression(flops: Stat | None, baseline: float | None) -> Stat | None:
    """``1 - FLOPs/baseline`` over a group's runs: linear, so its mean is ``1 - mean/baseline`` (exactly 0
    for the STL runs themselves) and its std ``std/baseline``."""
    if flops is None or baseline is None:
        return None
    return Stat(1.0 - flops.mean / baseline, None if flops.std is None else flops.std / baseline, flops.n)


# ---------------------------------------------------------------------------------------------- tables
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
        record["target_val_acc"] = "" if row.target is None else row.target
        record["stl_flops"] = "" if row.baseline_flops is None else row.baseline_flops
        records.append(record)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["strategy"])
        writer.writeheader()
        writer.writerows(records)


# ---------------------------------------------------------------------------------------------- plots
def _figure(nrows: int, ncols: int, width: float = 5.5, height: float = 3.8) -> tuple[Any, Any]:
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _series(run: Run, y: str, x: str) -> dict[float, tuple[float, float]]:
    """Step -> (x, y) over the rows that hold both columns."""
    return {r["step"]: (r[x], r[y]) for r in run.metrics if y in r and x in r and "step" in r}


def _mean_curve(runs: Sequence[Run], y: str, x: str) -> tuple[list[float], list[float]]:
    """The mean over runs of (x, y) at the steps every run logged (seeds share their logging steps)."""
    series = [_series(r, y, x) for r in runs]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    xs = [statistics.fmean(s[step][0] for s in series) for step in common]
    ys = [statistics.fmean(s[step][1] for s in series) for step in common]
    return xs, ys


def _primary_task(runs: Sequence[Run]) -> str | None:
    return next((r.summary.get("primary_task") for r in runs if r.summary.get("primary_task")), None)


def _style(i: int, points: int) -> dict[str, Any]:
    """Colour, dashes and markers of the i-th line: lines that lie on top of each other stay visible, and the
    markers of different lines sit at different points (staggered)."""
    every = max(1, points // 6)
    return {
        "color": f"C{i % 10}",
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
        "markevery": (min(i * max(1, every // 4), max(points - 1, 0)), every),
        "markersize": 5,
        "markerfacecolor": "none",
    }


def _flops_at(run: Run, step: float) -> float | None:
    """Cumulative training FLOPs just before ``step`` (the last ``cost/flops`` row before it)."""
    rows = [r for r in run.metrics if COST_FLOPS in r and "step" in r and r["step"] < step]
    return rows[-1][COST_FLOPS] if rows else 0.0 if step <= 0 else None


def _drop_points(group: Group, axis: str) -> list[float]:
    """Where the group's heads were dropped, on the x axis of the plot (steps, or GFLOP then)."""
    steps = sorted({s for r in group.runs for s in r.drop_steps().values()})
    if axis == "step":
        return steps
    points = []
    for step in steps:
        flops = [f for r in group.runs if (f := _flops_at(r, step)) is not None]
        if flops:
            points.append(statistics.fmean(flops) / 1e9)
    return points


def _legend(fig: Any, handles: list[Any], labels: list[str]) -> None:
    """One legend under all panels, in as many columns as its longest entry lets fit across the figure."""
    chars_across = fig.get_figwidth() * 72 / (8 * 0.6)  # 8 pt text, about 0.6 em a character
    fit = int(chars_across // (max(len(label) for label in labels) + 8))  # + the line sample and the gap
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(len(labels), 4, fit)), fontsize=8, frameon=False)


def _drop_handle(color: str = "0.3") -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=(0, (1, 2)), linewidth=1.2)


def plot_curves(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Primary training loss and validation accuracy per row (mean over seeds; faint: each run), against
    optimizer steps and against cumulative training FLOPs; dotted verticals where the row's heads left."""
    groups = group_runs(r for r in runs if r.metrics)
    primary = _primary_task(runs)
    if not groups or primary is None:
        return []
    loss = task_loss(primary)
    metric = metric_name(runs)
    unit = metric_unit(metric)
    paths = []
    axes_spec = {
        "step": ("step", "step", 1.0, "training step (optimizer steps)"),
        "flops": (COST_FLOPS, FLOPS_AT_VAL, 1e9, "cumulative training compute (GFLOP)"),
    }
    for axis, (train_x, val_x, x_scale, xlabel) in axes_spec.items():
        fig, axes = _figure(1, 2, height=4.2)
        panels = (
            (axes[0][0], loss, train_x, 1.0, f"training loss of '{primary}' (log scale)"),
            # Wrapped: a long metric name (e.g. "negative denoising loss") would run off the figure.
            (axes[0][1], VAL_METRIC, val_x, 100.0, textwrap.fill(f"validation {metric} of '{primary}' ({unit})", 36)),
        )
        handles, labels = [], []
        for panel, (ax, y, x, y_scale, ylabel) in enumerate(panels):
            for i, group in enumerate(groups):
                style = _style(i, 1)
                for run in group.runs:
                    pts = [xy for _, xy in sorted(_series(run, y, x).items())]  # in step order
                    ax.plot([p[0] / x_scale for p in pts], [p[1] * y_scale for p in pts], color=style["color"], alpha=0.2, linewidth=0.8)
                xs, ys = _mean_curve(group.runs, y, x)
                (line,) = ax.plot(
                    [v / x_scale for v in xs], [v * y_scale for v in ys], linewidth=1.6, **_style(i, len(xs))
                )
                for point in _drop_points(group, axis):
                    ax.axvline(point, color=style["color"], linestyle=(0, (1, 2)), linewidth=1.2, alpha=0.9)
                if panel == 0:
                    handles.append(line)
                    n = len(group.runs)
                    labels.append(f"{group.label} (mean of {n} runs)" if n > 1 else f"{group.label} (1 run)")
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_yscale("log")
        axes[0][0].set_title("Primary task: training loss", fontsize=10)
        axes[0][1].set_title(f"Primary task: validation {metric}", fontsize=10)
        if any(_drop_points(g, axis) for g in groups):
            handles.append(_drop_handle())
            labels.append("auxiliary heads dropped (dotted, in the row's colour)")
        _legend(fig, handles, labels)
        path = out_dir / f"curves_vs_{axis}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_weights(runs: Sequence[Run], out_dir: Path) -> Path | None:
    """The auxiliary weights ``mt2st/weight/<task>`` against steps, one panel per row (mean over seeds), with a
    dotted line where heads were dropped: ``aux_weights.png``."""
    fig = weights_figure(runs)
    if fig is None:
        return None
    path = out_dir / "aux_weights.png"
    fig.savefig(path, dpi=110)
    return path


def weights_figure(runs: Sequence[Run]) -> Any:
    """The figure of :func:`plot_weights` (``None`` when no run logged weights)."""
    groups = group_runs(r for r in runs if any(k.startswith(WEIGHT_PREFIX) for row in r.metrics for k in row))
    if not groups:
        return None
    ncols = 1 if len(groups) == 1 else 2 if len(groups) <= 4 else 3
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.8, height=3.2)
    tasks = sorted({k for g in groups for r in g.runs for row in r.metrics for k in row if k.startswith(WEIGHT_PREFIX)})
    handles: dict[str, Any] = {}
    for ax, group in zip((ax for row in axes for ax in row), groups, strict=False):
        top, first = 0.0, None
        for i, column in enumerate(tasks):
            xs, ys = _mean_curve(group.runs, column, "step")
            if not xs:  # the runs share no logged step: each run's own line
                pts = sorted(_series(group.runs[0], column, "step").values())
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if not xs:
                continue
            # Tasks often share one weight: dashes and staggered markers keep every line visible.
            (line,) = ax.plot(xs, ys, linewidth=1.5, **_style(i, len(xs)))
            handles.setdefault(column.removeprefix(WEIGHT_PREFIX), line)
            top, first = max([top, *ys]), xs[0] if first is None else min(first, xs[0])
        ax.set_ylim(-0.05 * max(top, 1.0), 1.1 * max(top, 1.0))
        ax.set_xlim(left=0)
        drops = sorted({step for r in group.runs for step in r.drop_steps().values()})
        for step in drops:
            ax.axvline(step, color="0.3", linestyle=(0, (1, 2)), linewidth=1.2)
        n = len(group.runs)
        details = f"{n} run{'s' * (n > 1)}; " + (
            f"heads dropped at step {', '.join(f'{s:g}' for s in drops)}" if drops else "no head dropped"
        )
        if first:
            details += f"; weights logged from step {first:g}"
        ax.set_title(f"{group.label}\n{details}", fontsize=9)
        ax.set(xlabel="training step (optimizer steps)", ylabel="auxiliary loss weight (unitless)")
        ax.grid(alpha=0.3)
    for ax in [ax for row in axes for ax in row][len(groups) :]:
        ax.set_visible(False)
    labels = [f"weight of '{task}'" for task in handles]
    legend_handles = list(handles.values())
    if any(r.drop_steps() for g in groups for r in g.runs):
        legend_handles.append(_drop_handle())
        labels.append("auxiliary heads dropped")
    _legend(fig, legend_handles, labels)
    return fig


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class Report:
    summary: Summary
    table: str
    markdown_path: Path
    csv_path: Path
    plots: list[Path]
    incomplete: list[IncompleteRun] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file the report wrote."""
        return [self.markdown_path, self.csv_path, *self.plots]

    def console_text(self, root: Path) -> str:
        """The table, its notes, the incomplete runs and the path of every file written."""
        parts = [self.table, "", table_notes(self.summary)]
        if self.incomplete:
            parts += ["", incomplete_note(self.incomplete, root)]
        parts += ["", "Wrote:", *(f"  {p}" for p in self.files)]
        return "\n".join(parts)


def incomplete_note(incomplete: Sequence[IncompleteRun], root: Path) -> str:
    lines = [f"Incomplete runs (no {SUMMARY_FILE}: killed, failed or still running; not in the table):"]
    return "\n".join(lines + [f"- {run.describe(root)}" for run in incomplete])


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read every run below ``root``; write ``summary.md``, ``summary.csv`` and the plots into ``out_dir``
    (default ``root``)."""
    root = Path(root)
    runs = collect_runs(root)
    incomplete = find_incomplete_runs(root)
    if not runs:
        found = f" ({len(incomplete)} incomplete run folders: {', '.join(str(r.dir) for r in incomplete)})" if incomplete else ""
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} below {root}{found}: point mt2st-report at a run or sweep folder"
        )
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    summary = summarize(runs)
    table = markdown_table(summary)
    others, streams = other_metrics_table(summary), stream_costs_table(summary)
    if others:
        table += f"\n\nOther test metrics (mean ± std over the same runs):\n\n{others}"
    if streams:
        table += f"\n\nAuxiliary data streams, loaded over each run (mean ± std over the same runs):\n\n{streams}"
    plots = plot_curves(runs, out)
    weights = plot_weights(runs, out)
    plots += [weights] if weights is not None else []

    markdown_path, csv_path = out / "summary.md", out / "summary.csv"
    write_csv(summary, csv_path)
    images = "\n".join(f"![{p.stem}]({_link(p, out)})" for p in plots)
    unfinished = f"{incomplete_note(incomplete, root)}\n\n" if incomplete else ""
    markdown_path.write_text(
        f"# MT2ST runs in {root}\n\n{len(runs)} finished runs; each row: mean ± std over its runs' seeds.\n\n"
        f"{table}\n\n{table_notes(summary)}\n\n{unfinished}{images}\n"
    )
    return Report(summary, table, markdown_path, csv_path, plots, incomplete)


def _link(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mt2st-report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dir", type=Path, help="a run or sweep folder (searched recursively for run_summary.json)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args(argv)
    require("report", "mt2st-report")
    try:
        report = write_report(args.dir, args.out)
    except FileNotFoundError as e:
        parser.exit(2, f"mt2st-report: error: {e}\n")
    print(report.console_text(args.dir))


if __name__ == "__main__":
    main()
