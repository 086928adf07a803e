"""The report's figures: the primary task's training loss and validation metric against steps and against
training FLOPs (``curves_vs_step.png``, ``curves_vs_flops.png``), and the auxiliary weights over time
(``aux_weights.png``), with the steps where heads were dropped.

The report's only module that uses matplotlib (the ``[report]`` extra); it imports it when a figure is drawn,
so that reading and tabulating runs works without it.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mt2st_lightning.app.run_format import VAL_PRIMARY_METRIC as VAL_METRIC
from mt2st_lightning.app.run_format import task_loss
from mt2st_lightning.names import COST_FLOPS, WEIGHT_PREFIX
from mt2st_lightning.names import COST_FLOPS_AT_VAL as FLOPS_AT_VAL
from mt2st_lightning.report.aggregate import Group, group_runs, metric_name, metric_unit
from mt2st_lightning.report.runs import Run

__all__ = ["plot_curves", "plot_weights", "weights_figure"]

LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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
    return next((r.summary.primary_task for r in runs), None)


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
        positive_loss = False
        for panel, (ax, y, x, y_scale, ylabel) in enumerate(panels):
            for i, group in enumerate(groups):
                style = _style(i, 1)
                for run in group.runs:
                    pts = [xy for _, xy in sorted(_series(run, y, x).items())]  # in step order
                    positive_loss = positive_loss or (panel == 0 and any(p[1] > 0 for p in pts))
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
        if positive_loss:  # matplotlib refuses a log axis with nothing positive on it (no loss logged)
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
