"""Hydra callbacks of ``mt2st-train``, configured under ``hydra.callbacks`` in ``conf/hydra/default.yaml``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["SweepSummary"]

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """At the end of a ``--multirun``: write the report into the sweep folder and print its table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mt2st_lightning.report import write_report  # the report (and matplotlib): loaded when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
        except Exception:
            # Training is done and saved; a failed summary must not hide that. Hydra would only warn anyway.
            log.exception("Could not summarise the sweep; run `mt2st-report %s` to retry", sweep_dir)
            return
        print(f"\nMT2ST sweep summary ({sweep_dir}):\n\n{report.console_text(sweep_dir)}", flush=True)
