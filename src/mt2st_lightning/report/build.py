"""The report of a folder of runs: read them, tabulate and plot them, and write ``summary.md``, ``summary.csv``
and the figures (:func:`write_report`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mt2st_lightning.app.run_format import SUMMARY_FILE
from mt2st_lightning.report.aggregate import Summary, summarize
from mt2st_lightning.report.plots import plot_curves, plot_weights
from mt2st_lightning.report.runs import IncompleteRun, collect_runs, find_incomplete_runs, relative_link
from mt2st_lightning.report.tables import (
    markdown_table,
    other_metrics_table,
    stream_costs_table,
    table_notes,
    write_csv,
)

__all__ = ["Report", "incomplete_note", "write_report"]


@dataclass
class Report:
    """What :func:`write_report` read and wrote."""

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
    images = "\n".join(f"![{p.stem}]({relative_link(p, out)})" for p in plots)
    unfinished = f"{incomplete_note(incomplete, root)}\n\n" if incomplete else ""
    markdown_path.write_text(
        f"# MT2ST runs in {root}\n\n{len(runs)} finished runs; each row: mean ± std over its runs' seeds.\n\n"
        f"{table}\n\n{table_notes(summary)}\n\n{unfinished}{images}\n"
    )
    return Report(summary, table, markdown_path, csv_path, plots, incomplete)
