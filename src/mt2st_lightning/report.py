"""``mt2st-report DIR``: compare MT2ST runs in the style of the paper's Table V, from what the runs wrote.

Finds every ``run_summary.json`` below ``DIR`` (written by ``mt2st-train``) and each run's ``metrics.csv``
(Lightning's ``CSVLogger``), groups the runs by label (the strategy, by default) and writes into ``DIR``:

- ``summary.md`` and ``summary.csv``: per group, mean ± std over seeds of test and best validation accuracy,
  wall time, training FLOPs, the compression rate against STL, FLOPs per batch after the switch, and the
  time and FLOPs to reach the STL runs' mean final validation accuracy;
- ``curves_vs_step.png``, ``curves_vs_flops.png``: primary training loss and validation accuracy;
- ``aux_weights.png``: the auxiliary weights over time, with the steps where heads were dropped.

Definitions:
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SUMMARY_FILE",
    "Report",
    "Row",
    "Run",
    "Stat",
    "collect_runs",
    "main",
    "markdown_table",
    "plot_curves",
    "plot_weights",
    "read_metrics",
    "summarize",
    "write_report",
]

SUMMARY_FILE = "run_summary.json"
VAL_METRIC = "val/primary_metric"
FLOPS_AT_VAL = "cost/flops_at_val"
TIME_AT_VAL = "cost/time_s_at_val"
WEIGHT_PREFIX = "mt2st/weight/"
# Table order for the built-in strategies; other labels follow alphabetically.
STRATEGY_ORDER = ("stl", "mtl", "diminish", "switch", "gradnorm", "fisher", "noise")
LINESTYLES = ("-", "--", ":", "-.")


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


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv``, each holding only the columns it has a value in."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def collect_runs(root: str | Path) -> list[Run]:
    """Every run below ``root`` (or ``root`` itself), in path order."""
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


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs by label, the built-in strategies first in their usual order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)

    def key(label: str) -> tuple[int, str]:
        return (STRATEGY_ORDER.index(label) if label in STRATEGY_ORDER else len(STRATEGY_ORDER), label)

    return {label: groups[label] for label in sorted(groups, key=key)}


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


@dataclass
class Summary:
    """The table's rows and what they are measured against (``None`` without STL runs)."""

    rows: list[Row]
    target: float | None  # the STL runs' mean final validation accuracy
    stl_flops: float | None  # the STL runs' mean training FLOPs: the compression baseline


def summarize(runs: Sequence[Run]) -> Summary:
    """One row per label. Compression and the target come from the runs with strategy ``stl``."""
    stl = [r for r in runs if r.strategy == "stl"]
    stl_flops = Stat.of(r.summary.get("train_flops") for r in stl)
    stl_final = Stat.of(r.final_val for r in stl)
    baseline = stl_flops.mean if stl_flops is not None and stl_flops.mean > 0 else None
    target = stl_final.mean if stl_final is not None else None

    rows = []
    for label, group in group_runs(runs).items():
        flops = Stat.of(r.summary.get("train_flops") for r in group)
        reached = [hit for r in group if target is not None and (hit := r.first_reach(target)) is not None]
        rows.append(
            Row(
                label=label,
                strategy=group[0].strategy,
                runs=len(group),
                seeds=sorted(r.summary.get("seed") for r in group),
                test_acc=Stat.of(r.summary.get("test_primary_metric") for r in group),
                best_val_acc=Stat.of(r.best_val for r in group),
                wall_time_s=Stat.of(r.summary.get("fit_wall_time_s") for r in group),
                train_time_s=Stat.of(r.summary.get("train_time_s") for r in group),
                train_flops=flops,
                compression=_compression(flops, baseline),
                flops_per_batch_last_phase=Stat.of(r.flops_per_batch_last_phase for r in group),
                time_to_target_s=Stat.of(hit.get(TIME_AT_VAL) for hit in reached),
                flops_to_target=Stat.of(hit.get(FLOPS_AT_VAL) for hit in reached),
                reached_target=len(reached),
            )
        )
    return Summary(rows, target, baseline)


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


def _to_target(stat: Stat | None, row: Row, fmt: Any, target: float | None) -> str:
    if target is None:
        return ""
    if row.reached_target == 0:
        return "not reached"
    cell = stat.format(fmt) if stat is not None else ""
    return cell if row.reached_target == row.runs else f"{cell} ({row.reached_target}/{row.runs} runs)"


COLUMNS = (
    "strategy",
    "runs",
    "test acc (%)",
    "best val acc (%)",
    "wall time (s)",
    "train time (s)",
    "train FLOPs",
    "compression vs STL (%)",
    "FLOPs/batch after switch",
    "time to target (s)",
    "FLOPs to target",
)


def markdown_table(summary: Summary) -> str:
    """The per-strategy table, as Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
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
            _to_target(row.time_to_target_s, row, _seconds, summary.target),
            _to_target(row.flops_to_target, row, _si, summary.target),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_notes(summary: Summary) -> str:
    notes = []
    if summary.stl_flops is None:
        notes.append(
            "No STL run here: compression is relative to nothing and left blank, and so is the target."
        )
    else:
        notes.append(
            f"Compression = 1 - FLOPs / {_si(summary.stl_flops)}FLOPs (the STL runs' mean training FLOPs)."
        )
    if summary.target is not None:
        notes.append(
            f"Target = {_percent(summary.target)} % val accuracy (the STL runs' mean final value); time and "
            "FLOPs to target are cumulative training cost at the first validation that reaches it."
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
        record["reached_target"] = row.reached_target if summary.target is not None else ""
        record["target_val_acc"] = "" if summary.target is None else summary.target
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


def _primary_loss_column(runs: Sequence[Run]) -> str | None:
    primary = next((r.summary.get("primary_task") for r in runs if r.summary.get("primary_task")), None)
    return f"train/loss/{primary}" if primary else None


def plot_curves(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Primary training loss and validation accuracy per strategy (mean over seeds; faint: each run), against
    optimizer steps and against cumulative training FLOPs."""
    groups = group_runs(r for r in runs if r.metrics)
    loss = _primary_loss_column(runs)
    if not groups or loss is None:
        return []
    paths = []
    for axis, (train_x, val_x, xlabel) in {
        "step": ("step", "step", "optimizer step"),
        "flops": ("cost/flops", FLOPS_AT_VAL, "cumulative training FLOPs"),
    }.items():
        fig, axes = _figure(1, 2)
        panels = (
            (axes[0][0], loss, train_x, "primary training loss"),
            (axes[0][1], VAL_METRIC, val_x, "validation accuracy"),
        )
        for ax, y, x, title in panels:
            for i, (label, group) in enumerate(groups.items()):
                color = f"C{i}"
                for run in group:
                    pts = [xy for _, xy in sorted(_series(run, y, x).items())]  # in step order
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.2, linewidth=0.8)
                xs, ys = _mean_curve(group, y, x)
                ax.plot(xs, ys, color=color, linewidth=1.8, label=f"{label} (n={len(group)})")
            ax.set(title=title, xlabel=xlabel, ylabel=y)
            ax.grid(alpha=0.3)
        axes[0][0].set_yscale("log")
        axes[0][1].legend(loc="lower right")
        path = out_dir / f"curves_vs_{axis}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_weights(runs: Sequence[Run], out_dir: Path) -> Path | None:
    """The auxiliary weights ``mt2st/weight/<task>`` against steps, one panel per strategy (mean over seeds),
    with a dashed line where heads were dropped."""
    groups = group_runs(r for r in runs if any(k.startswith(WEIGHT_PREFIX) for row in r.metrics for k in row))
    if not groups:
        return None
    ncols = 1 if len(groups) == 1 else 2 if len(groups) <= 4 else 3
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _figure(nrows, ncols, width=4.8, height=3.0)
    for ax, (label, group) in zip((ax for row in axes for ax in row), groups.items(), strict=False):
        columns = sorted({k for r in group for row in r.metrics for k in row if k.startswith(WEIGHT_PREFIX)})
        top = 0.0
        for i, column in enumerate(columns):
            xs, ys = _mean_curve(group, column, "step")
            # Tasks often share one weight: distinct dashes keep every line visible where they overlap.
            ax.plot(
                xs,
                ys,
                color=f"C{i}",
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                linewidth=1.6,
                label=column.removeprefix(WEIGHT_PREFIX),
            )
            top = max([top, *ys])
        ax.set_ylim(-0.05 * max(top, 1.0), 1.08 * max(top, 1.0))
        drops = sorted({step for r in group for step in r.drop_steps().values()})
        for step in drops:
            ax.axvline(step, color="k", linestyle="--", linewidth=1)
        title = label + (f": heads dropped at step {', '.join(f'{s:g}' for s in drops)}" if drops else "")
        ax.set(title=title, xlabel="optimizer step", ylabel="auxiliary weight")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in [ax for row in axes for ax in row][len(groups) :]:
        ax.set_visible(False)
    path = out_dir / "aux_weights.png"
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class Report:
    summary: Summary
    table: str
    markdown_path: Path
    csv_path: Path
    plots: list[Path]


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read every run below ``root``; write ``summary.md``, ``summary.csv`` and the plots into ``out_dir``
    (default ``root``)."""
    root = Path(root)
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} below {root}: point mt2st-report at a run or sweep folder"
        )
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    summary = summarize(runs)
    table = markdown_table(summary)
    plots = plot_curves(runs, out)
    weights = plot_weights(runs, out)
    plots += [weights] if weights is not None else []

    markdown_path, csv_path = out / "summary.md", out / "summary.csv"
    write_csv(summary, csv_path)
    images = "\n".join(f"![{p.stem}]({_link(p, out)})" for p in plots)
    markdown_path.write_text(
        f"# MT2ST runs in {root}\n\n{len(runs)} runs, mean ± std over seeds.\n\n{table}\n\n"
        f"{table_notes(summary)}\n\n{images}\n"
    )
    return Report(summary, table, markdown_path, csv_path, plots)


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
    try:
        report = write_report(args.dir, args.out)
    except FileNotFoundError as e:
        parser.exit(2, f"mt2st-report: error: {e}\n")
    print(report.table)
    print()
    print(table_notes(report.summary))
    print(f"\nWrote {report.markdown_path}, {report.csv_path}" + "".join(f", {p.name}" for p in report.plots))


if __name__ == "__main__":
    main()
