"""``mt2st-report DIR``: compare MT2ST runs in the style of the paper's Table V, from what the runs wrote.

The command line of :func:`~mt2st_lightning.report.build.write_report` (``mt2st-report``,
``python -m mt2st_lightning.report``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mt2st_lightning.app.run_format import SUMMARY_FILE, RunSummaryError
from mt2st_lightning.extras import require
from mt2st_lightning.report.build import write_report

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mt2st-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help=f"a run or sweep folder (searched recursively for {SUMMARY_FILE})")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args(argv)
    require("report", "mt2st-report")
    try:
        report = write_report(args.dir, args.out)
    except (FileNotFoundError, RunSummaryError) as e:
        parser.exit(2, f"mt2st-report: error: {e}\n")
    print(report.console_text(args.dir))
